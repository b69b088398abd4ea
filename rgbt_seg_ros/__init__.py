"""rgbt_seg_ros: RGB-thermal semantic segmentation for ROS 2 (SAM2-based backends)."""

__version__ = "0.1.0"

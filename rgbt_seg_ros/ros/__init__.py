"""Everything that imports rclpy or ROS messages: the node and its diagnostics, the node session used by
tools and tests, the bag player, the demo, the DDS benchmarks and the launch plan (docs/architecture.md).
"""

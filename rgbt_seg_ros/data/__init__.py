"""Data: the synthetic RGB-thermal set, sample bag and dataset writers, dataset loaders (MFNet, PST900, FMB,
folder), joint transforms, and rosbag2 reading, writing and recovery (docs/architecture.md).
"""

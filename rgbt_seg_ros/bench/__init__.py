"""Benchmarks without ROS: the segmenter benchmark, the GPU check and the models benchmarks run
(docs/architecture.md).
"""

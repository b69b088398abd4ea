"""The ROS-free frame path: message conversion, pairing, registration, the Segmenter, rendering, and the
node's parameter schema. The live node and bag replay drive the same objects (docs/architecture.md).
"""

"""Scoring: metrics, plots, a checkpoint on a dataset split, bag replay, and the result files and tables
built from them (docs/architecture.md).
"""

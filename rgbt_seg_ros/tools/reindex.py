"""``rgbt-seg reindex BAG``: see :mod:`rgbt_seg_ros.tools.bag_repair`."""

from .bag_repair import add_reindex_arguments as add_arguments
from .bag_repair import run_reindex as run

__all__ = ["add_arguments", "run"]

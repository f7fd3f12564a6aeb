"""Layer 1: LEAP in plain PyTorch (no DeepSpeed import).

- :mod:`layout`      how prunable units tile a weight matrix (unstructured, block, row, column, head, channel)
- :mod:`mask`        hard top-k mask with a learnable keep ratio and straight-through gradients
- :mod:`regularizer` global density, the density regulariser and the adaptive coefficient
- :mod:`group`       ``LeapGroup``: one learnable threshold (and optional learned scores)
- :mod:`selection`   which modules a rule matches, by regex over ``named_modules()``
- :mod:`masked`      masked subclasses of nn.Linear / Conv1D, swapped in place (deepcopy/pickle safe)
- :mod:`pruner`      ``LeapPruner``: attaches groups to a model without forking its code
"""
from .layout import TileLayout
from .mask import kept_units, topk_mask
from .regularizer import adaptive_lambda, density_regularizer
from .group import LeapGroup
from .selection import GroupRule, LeapConfigError
from .pruner import DistributedOps, LeapPruner, LeapUsageError

__all__ = ["TileLayout", "kept_units", "topk_mask", "adaptive_lambda", "density_regularizer",
           "LeapGroup", "GroupRule", "LeapConfigError", "LeapPruner", "LeapUsageError", "DistributedOps"]

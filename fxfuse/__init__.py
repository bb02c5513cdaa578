"""fxfuse: fuse trained single-task PyTorch models into one multi-task model.

The steps, one module each: `load` (safe loading), `trace` (tiers), `analyse` (cut
points), `plan` (which cuts), `split` (stages), `report` (`inspect`).
"""

from .analyse import Analysis, CutPoint, analyse
from .errors import FxfuseError
from .report import Report, inspect, split
from .trace import Traced, trace

__version__ = "0.1.0"

__all__ = [
    "Analysis",
    "CutPoint",
    "FxfuseError",
    "Report",
    "Traced",
    "analyse",
    "inspect",
    "split",
    "trace",
]

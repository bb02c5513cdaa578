"""fxfuse: fuse trained single-task PyTorch models into one multi-task model.

The steps, one module each: `load` (safe loading), `trace` (tiers), `analyse` (cut
points), `plan` (which cuts), `split` (stages), `report` (`inspect`), `generate`
(`fuse`), `artifact` (`save`/`load`).
"""

from ._version import __version__
from .analyse import Analysis, CutPoint, analyse
from .artifact import load, save
from .draw import draw
from .errors import FxfuseError
from .export import ExportReport, ParityCheck, export_onnx, export_pt2
from .generate import FusionInfo, fuse, unfreeze
from .report import Report, inspect, split
from .trace import Traced, trace

__all__ = [
    "Analysis",
    "CutPoint",
    "ExportReport",
    "FusionInfo",
    "FxfuseError",
    "ParityCheck",
    "Report",
    "Traced",
    "__version__",
    "analyse",
    "draw",
    "export_onnx",
    "export_pt2",
    "fuse",
    "inspect",
    "load",
    "save",
    "split",
    "trace",
    "unfreeze",
]

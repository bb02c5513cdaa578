"""fxfuse: fuse trained single-task PyTorch models into one multi-task model.

The steps, one module each: `load` (safe loading), `trace` (tiers), `analyse` (cut
points), `plan` (which cuts), `split` (stages), `report` (`inspect`), `generate`
(`fuse`; with `akf` for the fusion modules and `inputs` for how each model reads
the fused inputs), `artifact` (`save`/`load`), `train` (`fit`, `evaluate`; with
`heads` for the head mixing's start), `export` (`export_onnx`, `export_pt2`).
Data sets are in `fxfuse.data`; `draw` pictures a graph, `metrics` scores tasks,
`files` writes every file atomically, `errors` holds the error types, `cli` is the
command line.
"""

from . import data
from ._version import __version__
from .analyse import Analysis, CutPoint, analyse
from .artifact import load, save
from .draw import draw
from .errors import FxfuseError
from .export import ExportReport, ParityCheck, export_onnx, export_pt2
from .generate import FusionInfo, fuse, unfreeze
from .report import Report, inspect, split
from .trace import Traced, trace
from .train import FitResult, TrainConfig, evaluate, fit, infer_kinds

__all__ = [
    "Analysis",
    "CutPoint",
    "ExportReport",
    "FitResult",
    "FusionInfo",
    "FxfuseError",
    "ParityCheck",
    "Report",
    "TrainConfig",
    "Traced",
    "__version__",
    "analyse",
    "data",
    "draw",
    "evaluate",
    "export_onnx",
    "export_pt2",
    "fit",
    "fuse",
    "infer_kinds",
    "inspect",
    "load",
    "save",
    "split",
    "trace",
    "unfreeze",
]

"""Load models and example inputs from files, safely by default.

A model is named by a *spec*:

- ``model.pt2``: a ``torch.export`` archive. Loads without unpickling code: every
  tensor in it is read with ``weights_only=True``, and an archive that holds
  pickled Python objects (opaque or custom-class constants) is refused unless
  ``allow_pickle=True``.
- ``package.module:factory`` or ``path/to/file.py:factory``, optionally followed by
  ``@weights.safetensors`` or ``@state_dict.pt``: the factory builds the model and
  the weights (a safetensors file, or a state dict read with ``weights_only=True``)
  are loaded into it.
- ``model.pt``: a whole pickled ``nn.Module``. Unpickling runs whatever code the file
  names, so fxfuse reads such a file only with ``allow_pickle=True``
  (``--allow-pickle`` on the command line).

Example inputs are a tensor / tuple / dict file (read with ``weights_only=True``),
shapes such as ``2x3x224x224`` (random tensors; several separated by commas), or
features such as ``shop=int10,price=float`` (a dict of batch 2 with int64 ids below
10 and float32 values).
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import math
import os
import pickle
import re
import sys
import traceback
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .errors import InputError, LoadError
from .trace import quiet_torch_logs

MIN_BATCH = 2
# Example inputs made from shapes are random tensors; refuse sizes that would not fit
# in memory rather than fail inside torch.
MAX_EXAMPLE_ELEMENTS = 2**28
_SHAPE = re.compile(r"^\d+(x\d+)*$")
_FEATURE = re.compile(r"^(?P<name>[^=,]+)=(?P<kind>int|float)(?P<high>\d*)$")


@dataclass
class LoadedModel:
    """A model read from a spec.

    Attributes:
        name: a short name (file stem or factory name), used in messages and code.
        model: the module, in eval mode.
        source: the spec it came from.
        example_inputs: inputs stored with the model (``.pt2`` archives), or None.
    """

    name: str
    model: nn.Module
    source: str
    example_inputs: tuple | None = None


def load_model(spec: str, allow_pickle: bool = False) -> LoadedModel:
    """Read a model from a spec (see the module docstring).

    Raises:
        LoadError: the file is missing, unreadable, of the wrong kind, or a pickle
            without `allow_pickle`.
    """
    if ":" in spec and not _is_existing_file(spec):
        return _from_factory(spec)
    path = _existing(spec, "model")
    if path.suffix == ".pt2":
        return _from_archive(path, allow_pickle)
    if path.suffix == ".py":
        raise LoadError(
            f"'{spec}' is Python source; name the function or class in it that "
            f"builds the model: {spec}:FACTORY[@weights]"
        )
    if path.suffix == ".onnx":
        raise LoadError(
            f"'{spec}' is an ONNX model, which fxfuse cannot cut; give the PyTorch "
            "model: a .pt2 archive (torch.export.save) or module:factory[@weights]"
        )
    return _from_pickle(path, allow_pickle)


def _is_existing_file(spec: str) -> bool:
    return Path(spec).is_file()


def _existing(spec: str, what: str) -> Path:
    path = Path(spec)
    if not path.exists():
        raise LoadError(f"{what} file '{spec}' does not exist; check the path")
    if path.is_dir():
        raise LoadError(f"{what} '{spec}' is a folder, not a file; name the file")
    if path.stat().st_size == 0:
        raise LoadError(f"{what} file '{spec}' is empty; write it again")
    return path


def read_archive(
    path: str | os.PathLike, allow_pickle: bool = False
) -> torch.export.ExportedProgram:
    """Read a ``torch.export`` archive without running code stored in it.

    `torch.export.load` unpickles some entries of an archive: constants that are
    Python objects, and any tensor file it cannot read safely (it then retries
    with ``weights_only=False``). Unless `allow_pickle`, such entries are refused
    before loading and every ``torch.load`` underneath is forced to
    ``weights_only=True``.

    Raises:
        LoadError: the archive holds pickled objects (without `allow_pickle`) or
            cannot be read.
    """
    path = Path(path)
    if not allow_pickle:
        _refuse_pickled_objects(path)
    try:
        with quiet_torch_logs(), _weights_only(enabled=not allow_pickle):
            return torch.export.load(str(path))
    except Exception as error:
        raise LoadError(
            f"'{path}' is not a readable torch.export archive ({_reason(error)}); "
            "write it with torch.export.save(torch.export.export(model, inputs), "
            "path), or pass --allow-pickle if you trust a file that holds pickled "
            "objects",
            reason=_reason(error),
        ) from None


def _refuse_pickled_objects(path: Path) -> None:
    """Refuse archive entries that `torch.export.load` would unpickle as objects."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError) as error:
        raise LoadError(
            f"'{path}' is not a readable torch.export archive ({_reason(error)}); "
            "write it with torch.export.save(torch.export.export(model, inputs), path)",
            reason=f"not a torch.export archive: {_reason(error)}",
        ) from None
    for name in names:
        entry = name.rpartition("/")[2]
        if f"/{_CONSTANTS_DIR}" in f"/{name}" and entry.startswith(_OBJECT_PREFIXES):
            raise LoadError(
                f"'{path}' holds a pickled Python object ({name}): loading it would "
                "run code from the file, so fxfuse does not by default; if you trust "
                "the file, pass --allow-pickle (allow_pickle=True in Python)",
                limitation="pickled-models",
            )


# Where torch.export archives keep constants, and the file names of constants that
# are Python objects (restored with pickle) rather than tensors.
_CONSTANTS_DIR = "data/constants/"
_OBJECT_PREFIXES = ("custom_obj_", "opaque_obj_")


@contextlib.contextmanager
def _weights_only(enabled: bool):
    """Force ``weights_only=True`` on every ``torch.load`` inside, even where the
    caller asks for ``weights_only=False``."""
    if not enabled:
        yield
        return
    variable = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"
    before = os.environ.get(variable)
    os.environ[variable] = "1"
    try:
        yield
    finally:
        if before is None:
            del os.environ[variable]
        else:
            os.environ[variable] = before


def _from_archive(path: Path, allow_pickle: bool = False) -> LoadedModel:
    program = read_archive(path, allow_pickle)
    _require_dynamic_batch(program, path)
    module = program.module()
    inputs = None
    stored = getattr(program, "example_inputs", None)
    if stored is not None:
        args, kwargs = stored
        inputs = tuple(args) if args and not kwargs else None
    return LoadedModel(path.stem, module, str(path), inputs)


def _require_dynamic_batch(program, path: Path) -> None:
    """A program exported with a fixed batch size cannot serve other batches."""
    user_inputs = set(program.graph_signature.user_inputs)
    for node in program.graph.nodes:
        value = node.meta.get("val")
        if node.op != "placeholder" or node.name not in user_inputs:
            continue
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            if isinstance(value.shape[0], int):
                raise LoadError(
                    f"'{path}' was exported with a fixed batch size of "
                    f"{value.shape[0]} (input '{node.name}'); export it again with a "
                    "dynamic batch: torch.export.export(model, inputs, "
                    "dynamic_shapes=...) with torch.export.Dim.AUTO on dim 0",
                    limitation="static-archives",
                )


def _from_pickle(path: Path, allow_pickle: bool) -> LoadedModel:
    if allow_pickle:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as error:
            raise LoadError(f"cannot read '{path}': {_reason(error)}") from None
        if not isinstance(obj, nn.Module):
            raise LoadError(
                f"'{path}' holds a {type(obj).__name__}, not an nn.Module; "
                "save the whole model with torch.save(model, path)"
            )
        return LoadedModel(path.stem, obj.eval(), str(path))

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if "Unsupported global" in str(error):
            raise LoadError(
                f"'{path}' holds a pickled Python object (a whole model): loading it "
                "would run code from the file, so fxfuse does not by default; if you "
                "trust the file, pass --allow-pickle (allow_pickle=True in Python), "
                "or save the model as a .pt2 archive with torch.export",
                limitation="pickled-models",
            ) from None
        raise LoadError(_not_a_model(path, error)) from None
    except Exception as error:
        raise LoadError(_not_a_model(path, error)) from None
    kind = "a state dict" if isinstance(obj, dict) else f"a {type(obj).__name__}"
    raise LoadError(
        f"'{path}' holds {kind}, not a model; name the code that builds the model "
        f"as module:factory@{path}"
    )


def _not_a_model(path: Path, error: BaseException) -> str:
    if zipfile.is_zipfile(path) or "zip" in str(error).lower():
        detail = "a damaged or truncated archive"
    else:
        detail = "not a PyTorch file"
    return (
        f"'{path}' is {detail} ({_reason(error)}); give a .pt2 archive, a pickled "
        "model with --allow-pickle, or module:factory@weights"
    )


def _from_factory(spec: str) -> LoadedModel:
    target, _, weights = spec.partition("@")
    module_name, _, factory_name = target.rpartition(":")
    if not module_name.strip() or not factory_name.strip():
        raise LoadError(
            f"model '{spec}' is not module:factory[@weights]; give both parts, e.g. "
            "models.py:SmallResNet or mypackage.models:build_mlp@mlp.safetensors"
        )
    module = _import(module_name, spec)
    factory = getattr(module, factory_name, None)
    if not callable(factory):
        raise LoadError(
            f"'{module_name}' has no callable '{factory_name}'; the spec is "
            "module:factory[@weights], e.g. mymodels:build_mlp@mlp.safetensors"
        )
    try:
        model = factory()
    except Exception as error:
        raise LoadError(
            f"{target}() raised {type(error).__name__}{_user_line(error)}: "
            f"{_reason(error)}; fix the factory so that it builds the model with no "
            "arguments"
        ) from None
    if not isinstance(model, nn.Module):
        raise LoadError(
            f"{target}() returned a {type(model).__name__}, not an nn.Module"
        )
    if weights:
        load_weights(model, weights)
    return LoadedModel(factory_name, model.eval(), spec)


def _import(module_name: str, spec: str):
    if module_name.endswith(".py"):
        path = _existing(module_name, "module")
        name = f"fxfuse_user_{path.stem}"
        loader = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(loader)
        sys.modules[name] = module
        try:
            loader.loader.exec_module(module)
        except Exception as error:
            del sys.modules[name]
            raise LoadError(
                f"importing '{path}' raised {type(error).__name__}"
                f"{_user_line(error)}: {_reason(error)}; fix the file so that it "
                "imports on its own"
            ) from None
        return module
    try:
        return importlib.import_module(module_name)
    except ImportError as error:
        raise LoadError(
            f"cannot import '{module_name}' from '{spec}' ({_reason(error)}); "
            "install the package or give a path to the .py file"
        ) from None


def load_weights(model: nn.Module, weights: str) -> None:
    """Load a safetensors file or a weights-only state dict into `model`.

    Raises:
        LoadError: the file is unreadable or its keys or shapes do not match.
    """
    path = _existing(weights, "weights")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise LoadError(f"cannot read weights '{path}': {_reason(error)}") from None
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise LoadError(f"'{path}' holds a {type(state).__name__}, not a state dict")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as error:
        first = str(error).strip().splitlines()
        detail = " ".join(line.strip() for line in first[1:3])
        raise LoadError(
            f"weights '{path}' do not fit {type(model).__name__}: {detail[:300]}; "
            "check that the factory builds the same architecture"
        ) from None


def parse_example_inputs(spec: str, seed: int = 0) -> tuple:
    """Example inputs from a file, shapes or features (see the module docstring).

    Raises:
        InputError: the spec is neither, or its batch is smaller than 2.
    """
    generator = torch.Generator().manual_seed(seed)
    if Path(spec).exists():
        inputs = _inputs_from_file(_existing(spec, "example inputs"))
    elif all(_SHAPE.match(part) for part in spec.split(",")):
        shapes = [[int(d) for d in part.split("x")] for part in spec.split(",")]
        _check_shapes(spec, shapes)
        inputs = tuple(torch.randn(*shape, generator=generator) for shape in shapes)
    elif all(_FEATURE.match(part) for part in spec.split(",")):
        inputs = (_features(spec, generator),)
    else:
        raise InputError(
            f"example inputs '{spec}' are neither a file, shapes like 2x3x224x224, "
            "nor features like shop=int10,price=float"
        )
    check_batch(inputs)
    return inputs


def _check_shapes(spec: str, shapes: list[list[int]]) -> None:
    if any(0 in shape for shape in shapes):
        raise InputError(
            f"example input shapes '{spec}' have a dimension of 0; give sizes of at "
            "least 1, e.g. 2x3x224x224"
        )
    elements = sum(math.prod(shape) for shape in shapes)
    if elements > MAX_EXAMPLE_ELEMENTS:
        raise InputError(
            f"example input shapes '{spec}' make {elements:,} numbers, more than "
            f"{MAX_EXAMPLE_ELEMENTS:,}; a batch of 2 and a smaller size are enough "
            "to trace a model"
        )


def _inputs_from_file(path: Path) -> tuple:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise InputError(
            f"cannot read example inputs '{path}' ({_reason(error)}); save a tensor, "
            "tuple or dict of tensors with torch.save"
        ) from None
    if isinstance(obj, torch.Tensor | dict):
        return (obj,)
    if isinstance(obj, list | tuple):
        return tuple(obj)
    raise InputError(
        f"example inputs '{path}' hold a {type(obj).__name__}; save a tensor, a "
        "tuple of positional arguments, or a dict of named tensors"
    )


# Ids of an intN feature are int64; no embedding table comes near this many rows.
MAX_VOCABULARY = 2**62


def _features(spec: str, generator: torch.Generator) -> dict[str, torch.Tensor]:
    features = {}
    for part in spec.split(","):
        match = _FEATURE.match(part)
        name, kind, high = match["name"], match["kind"], match["high"]
        if name in features:
            raise InputError(
                f"feature '{name}' is given twice in '{spec}'; give each feature once"
            )
        if kind == "int":
            if high and int(high) < 1:
                raise InputError(
                    f"feature '{part}' has an empty vocabulary (intN draws ids 0 to "
                    f"N-1); give the vocabulary size, e.g. {name}=int10"
                )
            if high and int(high) > MAX_VOCABULARY:
                raise InputError(
                    f"feature '{part}' has a vocabulary above {MAX_VOCABULARY:,} ids; "
                    "give the size of the model's embedding table"
                )
            features[name] = torch.randint(
                0, int(high or 2), (MIN_BATCH,), generator=generator
            )
        else:
            features[name] = torch.rand(MIN_BATCH, generator=generator)
    return features


def check_batch(inputs: tuple) -> None:
    """Every tensor of the example inputs needs a batch dimension of at least 2."""
    leaves = torch.utils._pytree.tree_leaves(inputs)
    tensors = [t for t in leaves if isinstance(t, torch.Tensor)]
    if not tensors:
        raise InputError("the example inputs hold no tensor; give at least one")
    for tensor in tensors:
        if tensor.dim() == 0 or tensor.shape[0] < MIN_BATCH:
            shape = "x".join(map(str, tensor.shape)) or "a scalar"
            raise InputError(
                f"example input of shape {shape} has a batch smaller than "
                f"{MIN_BATCH}; give a batch of at least {MIN_BATCH} so that the batch "
                "dimension can be told apart"
            )


def _user_line(error: BaseException) -> str:
    """`` at file:line`` of the innermost frame outside fxfuse and Python's import
    machinery, or of the offending line of a syntax error."""
    if isinstance(error, SyntaxError) and error.filename:
        return f" at {error.filename}:{error.lineno}"
    frames = [
        frame
        for frame in traceback.extract_tb(error.__traceback__)
        if not frame.filename.startswith((_OWN_DIR, "<frozen"))
    ]
    return f" at {frames[-1].filename}:{frames[-1].lineno}" if frames else ""


_OWN_DIR = str(Path(__file__).resolve().parent)


def _reason(error: BaseException) -> str:
    text = str(error)
    if "WeightsUnpickler error:" in text:
        # torch's own advice to retry without weights_only is not ours to give.
        text = text.split("WeightsUnpickler error:", 1)[1]
    lines = text.strip().splitlines()
    if not lines or lines[0].strip().isdigit():
        # Some readers raise with a bare byte value or offset as their message.
        return f"{type(error).__name__}: unrecognised content"
    return lines[0][:200]

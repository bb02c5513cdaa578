"""Export a fused model to ONNX or to a ``.pt2`` program, and check that it still agrees.

Both formats are written the same way:

1. Capture the model with ``torch.export.export(..., strict=False)`` in eval mode,
   with dimension 0 of every input tensor dynamic (the batch).
2. Convert: ``torch.onnx.export(program, dynamo=True)`` for ``.onnx``, with inputs
   named after the model's inputs (the keys of a dict input, else the fused model's
   input names) and outputs named after the tasks; ``torch.export.save`` for
   ``.pt2``.
3. Write the file atomically (into a temporary folder beside it, then one rename)
   and a JSON side file beside it (``fused.onnx.json``) with the input and output
   names, dtypes and shapes, the tolerance and the parity results.
4. Check parity at batch sizes other than the example batch: inputs made by
   resampling rows of the example inputs (so that integer ids stay valid) go through
   eager PyTorch and through ONNX Runtime or the re-loaded program; every output must
   agree within the tolerance. Both are timed.

Example::

    report = export_onnx(fused, fused.example_inputs, "fused.onnx")
    print(report.summary())
    # fused.onnx (onnx): 1 input (x), outputs left, right
    # parity passed (tolerance 1e-04)
    #   batch   3: left 2.8e-07, right 3.7e-09; torch 21.30 ms, onnxruntime 6.20 ms
    #   batch  17: left 2.8e-07, right 3.7e-09; torch 58.02 ms, onnxruntime 31.75 ms
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import math
import os
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree

from ._version import __version__
from .errors import ExportError
from .files import errors_name, write_text

log = logging.getLogger("fxfuse")

BATCH = "batch"
TIMED_RUNS = 5
FORMATS = {".onnx": "onnx", ".pt2": "pt2"}
_RUNTIME_NAMES = {"onnx": "onnxruntime", "pt2": "torch.export"}


@dataclass
class ParityCheck:
    """Exported model against eager PyTorch at one batch size.

    Attributes:
        batch_size: rows in the inputs checked.
        max_abs_diff: largest absolute difference per output (task).
        torch_ms: eager PyTorch latency of one call (median of a few runs).
        runtime_ms: latency of ONNX Runtime or of the re-loaded ``.pt2`` program.
    """

    batch_size: int
    max_abs_diff: dict[str, float]
    torch_ms: float
    runtime_ms: float


@dataclass
class ExportReport:
    """What an export wrote and how well the written model agrees with PyTorch.

    Attributes:
        path: the exported file.
        format: ``"onnx"`` or ``"pt2"``.
        input_names: the exported model's inputs, in order.
        output_names: its outputs, in order (the tasks of a fused model).
        checks: one parity check per batch size.
        tolerance: the largest absolute difference accepted.
        passed: whether every output agreed within `tolerance` at every batch size.
    """

    path: Path
    format: str
    input_names: list[str]
    output_names: list[str]
    checks: list[ParityCheck]
    tolerance: float
    passed: bool

    def summary(self) -> str:
        """A few lines: the file, then per batch size each output's largest
        difference and both latencies."""
        inputs = ", ".join(self.input_names[:4])
        if len(self.input_names) > 4:
            inputs += ", ..."
        runtime = _RUNTIME_NAMES[self.format]
        lines = [
            f"{self.path} ({self.format}): {len(self.input_names)} input"
            f"{'s' * (len(self.input_names) != 1)} ({inputs}), outputs "
            f"{', '.join(self.output_names)}",
            f"parity {'passed' if self.passed else 'FAILED'} "
            f"(tolerance {self.tolerance:.0e})",
        ]
        for check in self.checks:
            diffs = ", ".join(
                f"{name} {diff:.2g}" for name, diff in check.max_abs_diff.items()
            )
            lines.append(
                f"  batch {check.batch_size:>3}: {diffs}; torch {check.torch_ms:.2f} "
                f"ms, {runtime} {check.runtime_ms:.2f} ms"
            )
        return "\n".join(lines)


def export(
    model: nn.Module, example_inputs: tuple | None, path: str | os.PathLike, **kw
) -> ExportReport:
    """Export to ONNX or ``.pt2``, chosen by the suffix of `path`.

    Args:
        model: the model, usually from `fxfuse.fuse` or `fxfuse.load`.
        example_inputs: positional inputs, batch >= 2; None takes the ones the fused
            model carries (``model.example_inputs``).
        path: ``*.onnx`` or ``*.pt2``.
        **kw: passed on to `export_onnx` or `export_pt2`.

    Raises:
        ExportError: the suffix is neither, or the export or its parity check failed.
    """
    path = Path(path)
    kind = FORMATS.get(path.suffix.lower())
    if kind is None:
        raise ExportError(
            f"cannot export to '{path}': unknown suffix '{path.suffix}'; use .onnx "
            "(ONNX Runtime) or .pt2 (torch.export, for Python serving)"
        )
    exporter = export_onnx if kind == "onnx" else export_pt2
    return exporter(model, example_inputs, path, **kw)


def export_onnx(
    model: nn.Module,
    example_inputs: tuple | None,
    path: str | os.PathLike,
    *,
    tolerance: float = 1e-4,
    check_batches: Sequence[int] = (3, 17),
    opset: int | None = None,
) -> ExportReport:
    """Export `model` to ONNX with a dynamic batch and check it with ONNX Runtime.

    Inputs are named after the model's inputs: the keys of a dict input as they are,
    else ``fusion_info.input_names`` of a fused model (the argument name its models'
    ``forward`` share, such as ``"image"``, else ``"x"``), else ``input_0``,
    ``input_1``, ... Outputs are named after the keys of the returned dict (the
    tasks), else ``output`` or ``output_0``, ... Large models keep their weights in
    ``<path>.data`` beside the file.

    Args:
        model: the model; exported in eval mode (a model in train mode is switched
            for the export and back, with a warning).
        example_inputs: positional inputs, batch >= 2; None takes
            ``model.example_inputs``.
        path: the ``.onnx`` file to write. A JSON side file ``<path>.json`` is
            written beside it.
        tolerance: largest absolute difference accepted between ONNX Runtime and
            eager PyTorch, per output.
        check_batches: batch sizes of the parity check; a size equal to the example
            batch is replaced by the next one, so that the check always runs at
            sizes the export did not see.
        opset: ONNX opset version; None takes torch's default.

    Limitations:
        Dimension 0 of every input tensor is the batch, one size for all inputs;
        inputs that are not tensors are fixed at their example values.

    Returns:
        The report; `ExportReport.summary` gives it in a few lines.

    Raises:
        ExportError: the model cannot be captured or converted, or an output
            differs by more than `tolerance`. In that last case the file and its
            JSON side file are written first (the side file says the check
            failed), and the error's ``report`` attribute holds the report.
    """
    import onnxruntime

    def convert(program, names, dynamic, target: Path) -> None:
        onnx_program = _onnx_program(program, names, dynamic, opset)
        onnx_program.save(str(target), external_data=False)

    def runtime(target: Path, names: _Names) -> Callable[[tuple], list[torch.Tensor]]:
        options = onnxruntime.SessionOptions()
        # Idle ONNX Runtime threads spin by default and would slow the eager runs
        # timed between them.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        session = onnxruntime.InferenceSession(
            str(target), options, providers=["CPUExecutionProvider"]
        )
        found = [i.name for i in session.get_inputs()]
        if found != names.inputs:
            raise ExportError(
                f"{target} has inputs {found}, expected {names.inputs}; the exporter "
                "did not keep the input names"
            )

        def run(inputs: tuple) -> list[torch.Tensor]:
            feeds = dict(zip(names.inputs, _numpy_leaves(inputs), strict=True))
            return [torch.from_numpy(a) for a in session.run(names.outputs, feeds)]

        return run

    return _export(
        "onnx", model, example_inputs, path, tolerance, check_batches, convert, runtime
    )


def export_pt2(
    model: nn.Module,
    example_inputs: tuple | None,
    path: str | os.PathLike,
    *,
    tolerance: float = 1e-4,
    check_batches: Sequence[int] = (3, 17),
) -> ExportReport:
    """Export `model` as a ``torch.export`` program (``.pt2``) for Python serving.

    Load it with ``torch.export.load(path).module()``; it takes the same inputs as
    the model and returns the same structure (a dict from task to prediction). The
    parity check runs that re-loaded module against the eager model.

    Args:
        model: the model; exported in eval mode (see `export_onnx`).
        example_inputs: positional inputs, batch >= 2; None takes
            ``model.example_inputs``.
        path: the ``.pt2`` file to write; ``<path>.json`` is written beside it.
        tolerance: largest absolute difference accepted per output.
        check_batches: batch sizes of the parity check (see `export_onnx`).

    Returns:
        The report.

    Raises:
        ExportError: as for `export_onnx`.
    """

    def convert(program, names, dynamic, target: Path) -> None:
        torch.export.save(program, str(target))

    def runtime(target: Path, names: _Names) -> Callable[[tuple], list[torch.Tensor]]:
        module = torch.export.load(str(target)).module()

        def run(inputs: tuple) -> list[torch.Tensor]:
            with torch.no_grad():
                return _tensor_leaves(module(*inputs))

        return run

    return _export(
        "pt2", model, example_inputs, path, tolerance, check_batches, convert, runtime
    )


# ------------------------------------------------------------------ the common steps


@dataclass
class _Names:
    """The exported model's input and output names, in order."""

    inputs: list[str]
    outputs: list[str]


def _export(
    kind: str,
    model: nn.Module,
    example_inputs: tuple | None,
    path: str | os.PathLike,
    tolerance: float,
    check_batches: Sequence[int],
    convert: Callable[[Any, _Names, Any, Path], None],
    runtime: Callable[[Path, _Names], Callable[[tuple], list[torch.Tensor]]],
) -> ExportReport:
    """Capture, convert, write atomically, then check parity and write the report."""
    path = Path(path)
    inputs = _example_inputs(model, example_inputs)
    batch = _batch_size(inputs)
    sizes = _check_sizes(check_batches, batch)

    with _eval_mode(model):
        with torch.no_grad():
            outputs = model(*inputs)
        names = _Names(_input_names(model, inputs), _output_names(outputs))
        program = _capture(model, inputs)
        log.info("writing %s", path)
        _write_atomically(
            path, lambda target: _convert(convert, program, names, inputs, target)
        )
        run = runtime(path, names)
        checked = [
            _check(model, run, _resample(inputs, size, seed=size), names)
            for size in sizes
        ]
    checks = [check for check, _ in checked]

    failures = [
        (name, check.batch_size, diff)
        for check in checks
        for name, diff in check.max_abs_diff.items()
        if not diff <= tolerance
    ]
    report = ExportReport(
        path=path,
        format=kind,
        input_names=names.inputs,
        output_names=names.outputs,
        checks=checks,
        tolerance=tolerance,
        passed=not failures,
    )
    _write_side_file(report, inputs, outputs, [want for _, want in checked])
    log.info("%s", report.summary())
    if failures:
        name, size, diff = max(failures, key=lambda f: _sort_key(f[2]))
        error = ExportError(
            f"{path}: output '{name}' differs from eager PyTorch by {diff:.3g} at "
            f"batch {size}, over the tolerance {tolerance:g}; the file is kept and "
            f"{_side_file(path).name} records the failed check. Check the model, or "
            "if the difference is acceptable raise the tolerance (--tolerance, "
            "tolerance=...)"
        )
        error.report = report
        raise error
    return report


def _sort_key(diff: float) -> float:
    return math.inf if math.isnan(diff) else diff


def _example_inputs(model: nn.Module, example_inputs) -> tuple:
    """The positional inputs as a tuple; a lone tensor or dict is one argument."""
    if example_inputs is None:
        example_inputs = getattr(model, "example_inputs", None)
        if example_inputs is None:
            raise ExportError(
                f"no example inputs for {type(model).__name__}: pass them, or export a "
                "model from fxfuse.fuse / fxfuse.load, which carries its own"
            )
    if isinstance(example_inputs, torch.Tensor | dict):
        example_inputs = (example_inputs,)
    return tuple(example_inputs)


def _batch_size(inputs: tuple) -> int:
    """The shared size of dimension 0 of every input tensor, at least 2."""
    tensors = pytree.tree_leaves(inputs)
    tensors = [t for t in tensors if isinstance(t, torch.Tensor)]
    sizes = {t.shape[0] for t in tensors if t.dim() > 0}
    if not tensors or len(sizes) != 1 or any(t.dim() == 0 for t in tensors):
        shapes = [tuple(t.shape) for t in tensors]
        raise ExportError(
            f"example inputs with shapes {shapes}: every input tensor needs the same "
            "batch size in dimension 0; pass one batch of inputs"
        )
    (size,) = sizes
    if size < 2:
        raise ExportError(
            "the example inputs have batch 1, which torch.export fixes as a constant; "
            "pass a batch of at least 2"
        )
    return size


def _check_sizes(check_batches: Sequence[int], batch: int) -> list[int]:
    """The check sizes, each moved off the example batch so that it proves the
    batch dimension is dynamic."""
    sizes = []
    for size in check_batches:
        if size < 1:
            raise ExportError(f"check batch sizes must be positive, got {size}")
        size = size + 1 if size == batch else size
        if size not in sizes:
            sizes.append(size)
    return sizes


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode inside the block; every module's mode is put back after it.

    A module from ``ExportedProgram.module()`` cannot switch modes (its ``train``
    and ``eval`` raise NotImplementedError): its mode was fixed when it was
    exported, and whatever its ``training`` flag says is not a mode to warn about.
    So the warning is given when some module actually switched from train to eval.
    """
    modes = [(module, module.training) for module in model.modules()]
    with contextlib.suppress(NotImplementedError):
        model.eval()
    if any(was and not module.training for module, was in modes):
        warnings.warn(
            "exported in eval mode; the model was in train mode",
            stacklevel=_caller_stacklevel(),
        )
    try:
        yield
    finally:
        # Flags are set directly: train() may be fixed (.pt2 modules) or
        # overridden (frozen stages stay in eval mode), and the flags are what was.
        for module, was in modes:
            module.training = was


def _input_names(model: nn.Module, inputs: tuple) -> list[str]:
    """One name per input tensor, in the order the exporters flatten them."""
    info = getattr(model, "fusion_info", None)
    given = list(getattr(info, "input_names", None) or [])
    if len(given) != len(inputs):
        given = [f"input_{i}" for i in range(len(inputs))]

    names = []
    for base, value in zip(given, inputs, strict=True):
        leaves = pytree.tree_flatten_with_path(value)[0]
        for key_path, leaf in leaves:
            if not isinstance(leaf, torch.Tensor):
                continue
            if not key_path:
                names.append(base)
            elif isinstance(value, dict) and len(key_path) == 1:
                names.append(str(key_path[0].key))
            else:
                names.append(base + pytree.keystr(key_path))
    if len(set(names)) < len(names):
        # Several dict inputs share a key: keep the keys apart by their input.
        duplicated = sorted({n for n in names if names.count(n) > 1})
        raise ExportError(
            f"input names {duplicated} occur in more than one input; give the model "
            "one dict input, or inputs whose keys differ"
        )
    return names


def _output_names(outputs: Any) -> list[str]:
    """The keys of a dict output (the tasks), else output / output_0, output_1..."""
    leaves = pytree.tree_flatten_with_path(outputs)[0]
    tensors = [(path, v) for path, v in leaves if isinstance(v, torch.Tensor)]
    if len(tensors) != len(leaves) or not tensors:
        raise ExportError(
            f"the model returns {type(outputs).__name__} with non-tensor values; "
            "export needs outputs that are tensors (a dict, tuple or one tensor)"
        )
    if isinstance(outputs, torch.Tensor):
        return ["output"]
    if isinstance(outputs, dict) and all(len(path) == 1 for path, _ in tensors):
        return [str(path[0].key) for path, _ in tensors]
    return [f"output{pytree.keystr(path)}" for path, _ in tensors]


def _dynamic_batch(inputs: tuple, dim: Any) -> tuple:
    """`dynamic_shapes` with dimension 0 of every input tensor set to `dim`."""
    return tuple(
        pytree.tree_map(
            lambda v: {0: dim} if isinstance(v, torch.Tensor) else None, value
        )
        for value in inputs
    )


def _capture(model: nn.Module, inputs: tuple):
    """``torch.export`` (non-strict) with a dynamic batch dimension."""
    dynamic = _dynamic_batch(inputs, torch.export.Dim.DYNAMIC)
    try:
        with _quiet():
            return torch.export.export(
                model, inputs, dynamic_shapes=dynamic, strict=False
            )
    except Exception as error:
        reason = _first_line(error)
        raise ExportError(
            f"torch.export could not capture {type(model).__name__} with a dynamic "
            f"batch: {reason}; a model must not depend on the batch size or on "
            "tensor values (use torch.where / torch.cond), see `fxfuse inspect`",
            limitation="export",
        ) from error


def _convert(convert, program, names: _Names, inputs: tuple, target: Path) -> None:
    try:
        with _quiet():
            convert(program, names, _dynamic_batch(inputs, BATCH), target)
    except ExportError:
        raise
    except Exception as error:
        raise ExportError(
            f"converting the captured program to {target.suffix} failed: "
            f"{_first_line(error)}; export to .pt2 instead, or report the operator "
            "named here",
            limitation="export",
        ) from error


def _onnx_program(program, names: _Names, dynamic: tuple, opset: int | None):
    """The ONNX model of an ExportedProgram, with named inputs, outputs and batch.

    The program's flat inputs are the tensors of the positional inputs in pytree
    order (the keys of a dict in insertion order), and its outputs the values of
    the returned dict in order; the names given here replace the exporter's own
    (``x_age``, ``getitem_3``). Dynamic shapes given as strings name the batch
    dimension ``batch`` instead of ``s0``.
    """
    options = {} if opset is None else {"opset_version": opset}
    onnx_program = torch.onnx.export(
        program,
        (),
        None,
        dynamo=True,
        input_names=names.inputs,
        output_names=names.outputs,
        dynamic_shapes=dynamic,
        verbose=False,
        **options,
    )
    found = [value.name for value in onnx_program.model.graph.inputs]
    if len(found) != len(names.inputs):
        raise ExportError(
            f"the ONNX model has {len(found)} inputs, expected {len(names.inputs)} "
            f"({names.inputs}); inputs that are not tensors cannot be exported"
        )
    return onnx_program


def _write_atomically(path: Path, write: Callable[[Path], None]) -> None:
    """`write` into a temporary folder beside `path`, then rename into place.

    The folder catches every file the writer makes (an ONNX model over 2 GB keeps
    its weights in ``<name>.data``, found by that name), so each file is renamed to
    the same name beside `path`; the main file last, so that a reader never sees it
    before its weights.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{path.name}."
    with errors_name(path, prefix):
        with tempfile.TemporaryDirectory(prefix=prefix, dir=path.parent) as tmp:
            staging = Path(tmp)
            write(staging / path.name)
            companions = [f for f in staging.iterdir() if f.name != path.name]
            for companion in companions:
                os.replace(companion, path.parent / companion.name)
            stale = path.with_name(path.name + ".data")
            if stale.exists() and not any(c.name == stale.name for c in companions):
                stale.unlink()
            os.replace(staging / path.name, path)


# ------------------------------------------------------------------------ parity


def _resample(inputs: tuple, size: int, seed: int) -> tuple:
    """`size` rows drawn with replacement from the example batch, so ids stay valid."""
    batch = _batch_size(inputs)
    generator = torch.Generator().manual_seed(seed)
    rows = torch.randint(batch, (size,), generator=generator)
    return pytree.tree_map(
        lambda v: (
            v[rows.to(v.device)].contiguous() if isinstance(v, torch.Tensor) else v
        ),
        inputs,
    )


def _check(
    model: nn.Module, run, inputs: tuple, names: _Names
) -> tuple[ParityCheck, list[torch.Tensor]]:
    """Compare and time the model and the exported runtime at one batch size.

    Returns:
        The check, and the eager outputs it compared against.
    """

    def eager() -> list[torch.Tensor]:
        with torch.no_grad():
            return _tensor_leaves(model(*inputs))

    want, torch_ms = _timed(eager)
    size = _batch_size(inputs)
    if not all(bool(t.isfinite().all()) for t in want if t.is_floating_point()):
        raise ExportError(
            f"the model itself outputs NaN or infinity at batch {size}, so there is "
            "nothing to check the export against; train it again (a lower learning "
            "rate) or fuse it again"
        )
    try:
        got, runtime_ms = _timed(lambda: run(inputs))
    except Exception as error:
        raise ExportError(
            f"the exported model fails at batch {size}: {_first_line(error)}; the "
            "batch dimension may have been fixed during export",
            limitation="export",
        ) from error
    diffs = {
        name: _max_abs_diff(g, w)
        for name, g, w in zip(names.outputs, got, want, strict=True)
    }
    log.info("parity at batch %d: %s", size, diffs)
    return ParityCheck(size, diffs, torch_ms, runtime_ms), want


def _timed(call: Callable[[], Any]) -> tuple[Any, float]:
    """The result of `call` and its median time in ms over a few runs after a
    warm-up, with the garbage collector paused as `timeit` does."""
    result = call()
    times = []
    collecting = gc.isenabled()
    gc.disable()
    try:
        for _ in range(TIMED_RUNS):
            start = time.perf_counter()
            call()
            times.append((time.perf_counter() - start) * 1000)
    finally:
        if collecting:
            gc.enable()
    return result, statistics.median(times)


def _max_abs_diff(got: torch.Tensor, want: torch.Tensor) -> float:
    """Largest absolute difference; inf when shapes differ, NaN only where just one
    side is NaN."""
    got, want = got.detach().cpu(), want.detach().cpu()
    if got.shape != want.shape:
        return math.inf
    if got.numel() == 0:
        return 0.0
    got, want = got.double(), want.double()
    both_nan = got.isnan() & want.isnan()
    diff = (got - want).abs().masked_fill(both_nan, 0.0)
    if diff.isnan().any():
        return math.nan
    return diff.max().item()


def _tensor_leaves(value: Any) -> list[torch.Tensor]:
    return [v for v in pytree.tree_leaves(value) if isinstance(v, torch.Tensor)]


def _numpy_leaves(inputs: tuple) -> list:
    return [t.detach().cpu().numpy() for t in _tensor_leaves(inputs)]


# --------------------------------------------------------------------- side file


def _side_file(path: Path) -> Path:
    return path.with_name(path.name + ".json")


def _write_side_file(
    report: ExportReport,
    inputs: tuple,
    outputs: Any,
    outputs_at_checks: list[list[torch.Tensor]],
) -> None:
    """``<path>.json``: names, dtypes, shapes ("batch" for dim 0) and parity.

    An output dimension is "batch" where its size changed with the batch size of
    the parity checks.
    """
    input_specs = [
        {"name": name, "dtype": _dtype(t), "shape": [BATCH, *t.shape[1:]]}
        for name, t in zip(report.input_names, _tensor_leaves(inputs), strict=True)
    ]
    output_specs = [
        {
            "name": name,
            "dtype": _dtype(t),
            "shape": _output_shape(t, [c[k] for c in outputs_at_checks]),
        }
        for k, (name, t) in enumerate(
            zip(report.output_names, _tensor_leaves(outputs), strict=True)
        )
    ]
    document = {
        "format": report.format,
        "file": report.path.name,
        "inputs": input_specs,
        "outputs": output_specs,
        "tolerance": report.tolerance,
        "passed": report.passed,
        "checks": [
            {**asdict(c), "max_abs_diff": _json_numbers(c.max_abs_diff)}
            for c in report.checks
        ],
        "versions": _versions(report.format),
    }
    text = json.dumps(document, indent=2) + "\n"
    write_text(_side_file(report.path), text)


def _output_shape(tensor: torch.Tensor, others: list[torch.Tensor]) -> list:
    """The shape of `tensor`, with "batch" where `others` (at other batch sizes)
    differ in size."""
    shape: list = list(tensor.shape)
    for other in others:
        if other.dim() == len(shape):
            for d, size in enumerate(other.shape):
                if size != tensor.shape[d]:
                    shape[d] = BATCH
    return shape


def _dtype(tensor: torch.Tensor) -> str:
    return str(tensor.dtype).removeprefix("torch.")


def _json_numbers(diffs: dict[str, float]) -> dict[str, float | str]:
    """JSON has no inf or NaN: write them as strings."""
    return {k: v if math.isfinite(v) else str(v) for k, v in diffs.items()}


def _versions(kind: str) -> dict[str, str]:
    versions = {"fxfuse": __version__, "torch": torch.__version__}
    if kind == "onnx":
        import onnx
        import onnxruntime

        versions["onnx"] = onnx.__version__
        versions["onnxruntime"] = onnxruntime.__version__
    return versions


# ------------------------------------------------------------------------ helpers


def _caller_stacklevel() -> int:
    """The `stacklevel` that points a warning at the first frame outside this
    module (and contextlib), whichever public function was called."""
    skip = {os.path.abspath(__file__), os.path.abspath(contextlib.__file__)}
    frame, level = sys._getframe(1), 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename) in skip:
        frame, level = frame.f_back, level + 1
    return level


def _first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    return (lines[0] if lines else type(error).__name__)[:200]


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """The exporters log and warn at length about their own steps; fxfuse reports
    what matters itself."""
    names = ("torch.export", "torch.onnx", "torch._export", "onnxscript")
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)

"""Partition benchmark: how long fxfuse takes to trace, analyse, plan and split.

Each step is timed on its own, with the functions of its module called directly:
`fxfuse.trace.trace`, `fxfuse.analyse.analyse`, `fxfuse.plan.plan_cuts` with
`fxfuse.split.split` (one column), and `fxfuse.split.check_parity` (its own column).
`fxfuse.split` and `fxfuse.inspect` always run the parity check, so two more columns
add it in: plan/split with parity, and the total of every step. The baseline is one
eager forward pass of the model at the same inputs, measured in the same run (warm,
median of 3): ``total/fwd`` says how many forward passes the whole partition costs,
which compares across machines and loads better than seconds do.
Four groups of measurements:

- every model of `tools.zoo.all_models()`, at its own example inputs;
- the models of ``../shared/cases`` that fxfuse must inspect (``expect="inspect"``),
  at their own example inputs;
- resnet50 at 2x3x224x224, the reference point: trace + analyse + plan/split should
  take under `RESNET50_TARGET_S` seconds, warm (one run first, then the median of 3);
  the parity check is reported beside it, and with it;
- synthetic chains of residual blocks of about 1k, 5k and 20k nodes, built directly
  with the `torch.fx.Graph` API on a 2x4 tensor so that running them costs almost
  nothing. The analysis is timed, and the growth exponent ``b`` of
  ``time = a * nodes ** b`` is fitted on log-log axes: near 1 is linear. Plan and
  split are timed once as well, and their exponent reported beside it. The
  baseline is one forward pass of the chain's GraphModule (one Python call per
  node), so ``analyse/fwd`` is the analysis cost per node in node executions.

    python tools/bench_partition.py                   # everything: bench/partition.json
    python tools/bench_partition.py --quick           # a few small models, 1k/5k graphs

Imports and torch's first-call set-up are kept out of every timing by one warm-up
run. Times are wall-clock seconds on the CPU; on a machine shared with other jobs
they are noisy, so compare ratios, or runs made under the same load (the JSON
records the load average at the start, before resnet50 and at the end).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import operator
import os
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.fx as fx  # noqa: E402
from torch import nn  # noqa: E402

from fxfuse.analyse import analyse  # noqa: E402
from fxfuse.files import write_text  # noqa: E402
from fxfuse.plan import plan_cuts  # noqa: E402
from fxfuse.split import check_parity, split  # noqa: E402
from fxfuse.trace import Traced, trace  # noqa: E402

RESNET50_TARGET_S = 1.0
RESNET50_INPUT = (2, 3, 224, 224)
SYNTHETIC_NODES = (1_000, 5_000, 20_000)
QUICK_SYNTHETIC_NODES = (1_000, 5_000)
QUICK_MODELS = (
    "resnet18",
    "mobilenet_v3_small",
    "vit_small",
    "deepfm",
    "mmoe",
    "multifashion_resnet",
)
# Above this growth exponent the analysis is clearly super-linear in graph size.
SUPERLINEAR_EXPONENT = 1.3
DEFAULT_OUT = ROOT / "bench" / "partition.json"
CASES_FILE = ROOT.parent / "shared" / "cases" / "cases.py"


# ------------------------------------------------------------------------ timing


@dataclass
class StepSeconds:
    """Seconds per step of one partition run."""

    trace: float
    analyse: float
    plan_split: float
    parity: float

    @property
    def partition(self) -> float:
        """Trace, analyse and plan/split: what `fxfuse.inspect` costs, less parity."""
        return self.trace + self.analyse + self.plan_split

    @property
    def split_with_parity(self) -> float:
        """Plan/split and the parity check that `fxfuse.split` always runs."""
        return self.plan_split + self.parity

    @property
    def total(self) -> float:
        """Every step, parity included: what `fxfuse.inspect` costs."""
        return self.partition + self.parity

    def as_dict(self) -> dict[str, float]:
        return {
            **asdict(self),
            "partition": self.partition,
            "split_with_parity": self.split_with_parity,
            "total": self.total,
        }


@dataclass
class Partition:
    """What one timed partition run found."""

    seconds: StepSeconds
    partition_cpu: float
    tier: str
    nodes: int
    cut_points: int
    chosen: list[str]


def partition(model: nn.Module, inputs: tuple, levels: int, name: str) -> Partition:
    """Trace, analyse, plan/split and check one model, timing each step.

    Mirrors `fxfuse.inspect`: a model with fewer cut points than `levels` is split
    at all of them.
    """
    model.eval()
    clock = time.perf_counter

    start, cpu_start = clock(), time.process_time()
    traced = trace(model, inputs)
    traced_at = clock()
    analysis = analyse(traced, model, inputs)
    analysed_at = clock()
    levels = min(levels, len(analysis.cut_points))
    chosen = plan_cuts(analysis, levels, name=name) if levels else []
    stages = split(traced.graph_module, [c.node for c in chosen])
    split_at, cpu_split_at = clock(), time.process_time()
    check_parity(stages, analysis.reference, inputs, name)
    checked_at = clock()

    return Partition(
        seconds=StepSeconds(
            trace=traced_at - start,
            analyse=analysed_at - traced_at,
            plan_split=split_at - analysed_at,
            parity=checked_at - split_at,
        ),
        partition_cpu=cpu_split_at - cpu_start,
        tier=traced.tier,
        nodes=len(traced.graph_module.graph.nodes),
        cut_points=len(analysis.cut_points),
        chosen=[c.closes or c.node for c in chosen],
    )


def median_seconds(runs: Sequence[StepSeconds]) -> StepSeconds:
    """The median of each step over several runs."""
    return StepSeconds(
        *(
            statistics.median(getattr(r, step) for r in runs)
            for step in ("trace", "analyse", "plan_split", "parity")
        )
    )


# ------------------------------------------------------------------------ models


@dataclass
class ModelRow:
    """One zoo model's timings, or the error that stopped it."""

    name: str
    family: str
    tier: str | None = None
    nodes: int | None = None
    cut_points: int | None = None
    chosen: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    partition_cpu_seconds: float | None = None
    forward_seconds: float | None = None
    ratios: dict[str, float] = field(default_factory=dict)
    error: str | None = None


def time_model(
    name: str,
    family: str,
    build: Callable[[], nn.Module],
    inputs: tuple,
    levels: int,
    repeats: int,
) -> ModelRow:
    """Median step times of a model over `repeats` runs, each on a fresh build,
    and the baseline: one forward pass of the model at the same inputs."""
    row = ModelRow(name=name, family=family)
    runs, cpu = [], []
    try:
        for _ in range(repeats):
            found = partition(build(), inputs, levels, name)
            runs.append(found.seconds)
            cpu.append(found.partition_cpu)
        forward = forward_seconds(build(), inputs)
    except Exception as error:  # one failing model must not stop the benchmark
        row.error = f"{type(error).__name__}: {_first_line(error)}"
        return row
    seconds = median_seconds(runs)
    row.tier, row.nodes = found.tier, found.nodes
    row.cut_points, row.chosen = found.cut_points, found.chosen
    row.seconds = seconds.as_dict()
    row.partition_cpu_seconds = statistics.median(cpu)
    row.forward_seconds = forward
    row.ratios = {
        "total_over_forward": seconds.total / forward,
        "partition_over_forward": seconds.partition / forward,
        "analyse_over_trace": seconds.analyse / seconds.trace,
        "parity_over_forward": seconds.parity / forward,
    }
    return row


def forward_seconds(model: nn.Module, inputs: tuple, repeats: int = 3) -> float:
    """One eager forward pass in eval mode: one run first, then the median of
    `repeats`."""
    model.eval()
    times = []
    with torch.no_grad():
        model(*inputs)
        for _ in range(repeats):
            start = time.perf_counter()
            model(*inputs)
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def zoo_rows(quick: bool, names: set[str] | None, levels: int, repeats: int):
    """Time every zoo model (or the quick handful, or the ones named)."""
    from tools.zoo import all_models

    entries = all_models()
    if names:
        entries = [e for e in entries if e.name in names]
    elif quick:
        entries = [e for e in entries if e.name in QUICK_MODELS]
    rows = []
    for entry in entries:
        print(f"  {entry.name} ...", end="", flush=True, file=sys.stderr)
        row = time_model(
            entry.name,
            entry.family,
            entry.build,
            entry.example_inputs(),
            levels,
            repeats,
        )
        print(" failed" if row.error else " done", file=sys.stderr)
        rows.append(row)
    return rows


def case_rows(levels: int, repeats: int) -> list[ModelRow]:
    """Time the cases of ``../shared/cases`` that fxfuse must inspect."""
    if not CASES_FILE.exists():
        print(f"  {CASES_FILE} is not there; no case rows", file=sys.stderr)
        return []
    spec = importlib.util.spec_from_file_location("shared_cases", CASES_FILE)
    cases = importlib.util.module_from_spec(spec)
    sys.modules["shared_cases"] = cases
    spec.loader.exec_module(cases)

    rows = []
    for name, case in sorted(cases.CASES.items()):
        if case.expect != "inspect":
            continue
        print(f"  case {name} ...", end="", flush=True, file=sys.stderr)
        torch.manual_seed(0)
        _, inputs = case.build()
        row = time_model(
            f"case:{name}",
            "case",
            lambda case=case: case.build()[0],
            inputs,
            levels,
            repeats,
        )
        print(" failed" if row.error else " done", file=sys.stderr)
        rows.append(row)
    return rows


def resnet50_row(levels: int, repeats: int = 3) -> ModelRow:
    """resnet50 at 2x3x224x224: one warm-up run, then the median of `repeats`."""
    import torchvision

    def build() -> nn.Module:
        return torchvision.models.resnet50(weights=None).eval()

    inputs = (torch.randn(*RESNET50_INPUT, generator=torch.Generator().manual_seed(0)),)
    time_model("resnet50@224", "resnet", build, inputs, levels, 1)  # warm-up
    return time_model("resnet50@224", "resnet", build, inputs, levels, repeats)


# --------------------------------------------------------------------- synthetic


class _Block(nn.Module):
    """The parameters of one residual block ``x + relu(fc(x))``."""

    def __init__(self, width: int):
        super().__init__()
        self.fc = nn.Linear(width, width)


def synthetic_chain(nodes: int, width: int = 4, per_group: int = 10):
    """A chain of residual blocks with about `nodes` graph nodes, built directly.

    Blocks sit ten to a group (``blocks.{g}.{i}``), so module paths have three
    levels, as in a real model; every node carries the ``nn_module_stack`` metadata
    the fx tracer would give it. Three nodes per block: ``fc``, ``relu``, ``add``.

    Returns:
        A `Traced` of the chain, the chain as a module, and its example inputs.
    """
    blocks = max(1, (nodes - 3) // 3)
    root = nn.Module()
    root.blocks = nn.Sequential(
        *(
            nn.Sequential(*(_Block(width) for _ in range(min(per_group, blocks - g))))
            for g in range(0, blocks, per_group)
        )
    )
    root.head = nn.Linear(width, 2)

    graph = fx.Graph()
    value = graph.placeholder("x")
    for g, group in enumerate(root.blocks):
        for i in range(len(group)):
            path = f"blocks.{g}.{i}"
            stack = {
                "blocks": ("blocks", nn.Sequential),
                f"blocks.{g}": (f"blocks.{g}", nn.Sequential),
                path: (path, _Block),
            }
            fc = graph.call_module(f"{path}.fc", (value,))
            fc.meta["nn_module_stack"] = {
                **stack,
                f"{path}.fc": (f"{path}.fc", nn.Linear),
            }
            relu = graph.call_function(torch.relu, (fc,))
            relu.meta["nn_module_stack"] = dict(stack)
            value = graph.call_function(operator.add, (value, relu))
            value.meta["nn_module_stack"] = dict(stack)
    head = graph.call_module("head", (value,))
    head.meta["nn_module_stack"] = {"head": ("head", nn.Linear)}
    graph.output(head)

    gm = fx.GraphModule(root, graph, "SyntheticChain").eval()
    inputs = (torch.randn(2, width, generator=torch.Generator().manual_seed(0)),)
    return Traced(gm, "fx"), gm, inputs


@dataclass
class SyntheticRow:
    """Times of one synthetic graph: the analysis in wall-clock seconds (median of
    `runs`) and in CPU seconds of this process (steadier when other jobs share the
    machine); plan and split once, for information."""

    nodes: int
    cut_points: int
    analyse_seconds: float
    analyse_cpu_seconds: float
    runs: int
    plan_split_seconds: float
    forward_seconds: float
    analyse_over_forward: float


def time_analysis(
    nodes: int, levels: int = 3, budget_s: float = 5.0, repeats: int = 3
) -> SyntheticRow:
    """Median analysis time of a synthetic chain: up to `repeats` runs, fewer when
    they already took more than `budget_s`; then one plan and split."""
    traced, model, inputs = synthetic_chain(nodes)
    times, cpu_times = [], []
    for _ in range(repeats):
        start, cpu_start = time.perf_counter(), time.process_time()
        analysis = analyse(traced, model, inputs)
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
        if sum(times) > budget_s:
            break

    start = time.perf_counter()
    chosen = plan_cuts(analysis, levels)
    split(traced.graph_module, [c.node for c in chosen])
    plan_split_seconds = time.perf_counter() - start
    forward = forward_seconds(model, inputs)

    return SyntheticRow(
        nodes=len(traced.graph_module.graph.nodes),
        cut_points=len(analysis.cut_points),
        analyse_seconds=statistics.median(times),
        analyse_cpu_seconds=statistics.median(cpu_times),
        runs=len(times),
        plan_split_seconds=plan_split_seconds,
        forward_seconds=forward,
        analyse_over_forward=statistics.median(times) / forward,
    )


def growth_exponent(
    rows: Sequence[SyntheticRow], clock: str = "analyse_seconds"
) -> float | None:
    """``b`` of ``seconds = a * nodes ** b``, by least squares on log-log axes.

    Args:
        rows: the synthetic graphs' timings.
        clock: which time to fit: a seconds field of `SyntheticRow`.
    """
    if len(rows) < 2:
        return None
    x = np.log([r.nodes for r in rows])
    y = np.log([getattr(r, clock) for r in rows])
    slope, _ = np.polyfit(x, y, 1)
    return float(slope)


# ------------------------------------------------------------------------ output


def load_average() -> list[float] | None:
    """The 1, 5 and 15 minute load averages of the machine."""
    return list(os.getloadavg()) if hasattr(os, "getloadavg") else None


def machine() -> dict:
    """What the numbers were measured on."""
    return {
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "malloc": os.environ.get("LD_PRELOAD", "") or "default",
        "malloc_conf": os.environ.get("MALLOC_CONF"),
        "load_average_at_start": load_average(),
    }


def write_json(path: Path, data: dict) -> None:
    """Write `data` to `path` in one rename, never half-way."""
    write_text(path, json.dumps(data, indent=2) + "\n")


def print_models(rows: Sequence[ModelRow]) -> None:
    steps = ("trace", "analyse", "plan_split", "parity", "partition")
    steps += ("split_with_parity", "total")
    titles = ("trace", "analyse", "plan+split", "parity", "no parity")
    titles += ("split+par", "total")
    header = f"{'model':<24}{'family':<16}{'tier':<10}{'nodes':>6}{'cuts':>6}"
    header += "".join(f"{t:>11}" for t in titles)
    header += f"{'forward':>10}{'total/fwd':>10}"
    print(header)
    for row in rows:
        line = f"{row.name:<24}{row.family:<16}"
        if row.error:
            print(f"{line}FAILED: {row.error}")
            continue
        line += f"{row.tier:<10}{row.nodes:>6}{row.cut_points:>6}"
        line += "".join(f"{row.seconds[s]:>11.3f}" for s in steps)
        line += f"{row.forward_seconds:>10.4f}"
        line += f"{row.ratios['total_over_forward']:>10.1f}"
        print(line)


def print_resnet50(row: ModelRow) -> None:
    if row.error:
        print(f"resnet50 failed: {row.error}")
        return
    s = row.seconds
    verdict = "met" if s["partition"] <= RESNET50_TARGET_S else "MISSED"
    print(
        f"resnet50 trace+analyse+split seconds: {s['partition']:.3f} "
        f"(target {RESNET50_TARGET_S:g} s: {verdict}; trace {s['trace']:.3f}, "
        f"analyse {s['analyse']:.3f}, plan+split {s['plan_split']:.3f}, "
        f"parity {s['parity']:.3f}; CPU time {row.partition_cpu_seconds:.3f})"
    )
    print(
        f"resnet50 with the parity check: split {s['split_with_parity']:.3f}, "
        f"total {s['total']:.3f} s = {row.ratios['total_over_forward']:.1f} forward "
        f"passes of {row.forward_seconds:.3f} s"
    )


def print_synthetic(rows: Sequence[SyntheticRow], exponents: dict) -> None:
    print(
        f"{'nodes':>7}{'cuts':>7}{'analyse s':>11}{'cpu s':>9}{'us/node':>9}"
        f"{'runs':>6}{'plan+split s':>14}{'forward s':>11}{'analyse/fwd':>13}"
    )
    for row in rows:
        per_node = 1e6 * row.analyse_seconds / row.nodes
        print(
            f"{row.nodes:>7}{row.cut_points:>7}{row.analyse_seconds:>11.3f}"
            f"{row.analyse_cpu_seconds:>9.3f}{per_node:>9.0f}{row.runs:>6}"
            f"{row.plan_split_seconds:>14.3f}{row.forward_seconds:>11.4f}"
            f"{row.analyse_over_forward:>13.1f}"
        )
    exponent = exponents["analyse"]
    if exponent is None:
        return
    verdict = "near-linear"
    if exponent > SUPERLINEAR_EXPONENT:
        verdict = "super-linear: the analysis slows down faster than the graph grows"
    elif _superlinear(exponents):
        verdict = "near-linear overall, but super-linear between the largest two"
    print(
        f"growth exponent b of the analysis (time ~ nodes^b): {exponent:.2f} "
        f"({verdict}); on CPU time {exponents['analyse_cpu']:.2f}; between the "
        f"largest two graphs {exponents['analyse_largest_two']:.2f}; of plan+split "
        f"{exponents['plan_split']:.2f}"
    )


def _superlinear(exponents: dict) -> bool:
    """Whether the analysis grows clearly faster than the graph, overall or
    between the two largest graphs (where a quadratic term shows first)."""
    fitted = [exponents["analyse"], exponents["analyse_largest_two"]]
    return any(b is not None and b > SUPERLINEAR_EXPONENT for b in fitted)


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return (lines[0] if lines else "")[:300]


# -------------------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="a few small models, 1k/5k graphs only"
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON output")
    parser.add_argument("--models", help="comma-separated zoo names to time instead")
    parser.add_argument("--levels", type=int, default=3, help="cuts per model")
    parser.add_argument(
        "--repeats", type=int, default=1, help="runs per zoo model (median)"
    )
    parser.add_argument(
        "--threads",
        type=int,
        help="torch threads (default: torch's); 1 gives steadier times on a "
        "machine shared with other jobs",
    )
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    names = set(args.models.split(",")) if args.models else None
    sizes = QUICK_SYNTHETIC_NODES if args.quick else SYNTHETIC_NODES
    started = machine()

    warnings.simplefilter("ignore")  # fallback-tier warnings are expected here
    print("warming up ...", file=sys.stderr)
    traced, model, inputs = synthetic_chain(100)
    analyse(traced, model, inputs)
    import torchvision

    small = torchvision.models.resnet18(weights=None, num_classes=10)
    partition(small, (torch.randn(2, 3, 64, 64),), args.levels, "warm-up")

    print("zoo models ...", file=sys.stderr)
    rows = zoo_rows(args.quick, names, args.levels, args.repeats)
    cases = []
    if not names:
        print("shared cases ...", file=sys.stderr)
        cases = case_rows(args.levels, args.repeats)
    print("resnet50 at 224x224 ...", file=sys.stderr)
    load_before_resnet50 = load_average()
    resnet50 = resnet50_row(args.levels)
    synthetic = []
    for size in sizes:
        print(f"synthetic graph of {size} nodes ...", file=sys.stderr)
        synthetic.append(time_analysis(size, args.levels))
    exponents = {
        "analyse": growth_exponent(synthetic),
        "analyse_cpu": growth_exponent(synthetic, "analyse_cpu_seconds"),
        "analyse_largest_two": growth_exponent(synthetic[-2:]),
        "plan_split": growth_exponent(synthetic, "plan_split_seconds"),
    }
    exponent = exponents["analyse"]

    resnet50_s = resnet50.seconds.get("partition")
    result = {
        "machine": {
            **started,
            "load_average_before_resnet50": load_before_resnet50,
            "load_average_at_end": load_average(),
        },
        "levels": args.levels,
        "quick": args.quick,
        "models": [asdict(r) for r in rows],
        "cases": [asdict(r) for r in cases],
        "resnet50": {
            **asdict(resnet50),
            "input": list(RESNET50_INPUT),
            "trace_analyse_split_seconds": resnet50_s,
            "with_parity_seconds": resnet50.seconds.get("total"),
            "target_seconds": RESNET50_TARGET_S,
            "met": resnet50_s is not None and resnet50_s <= RESNET50_TARGET_S,
        },
        "synthetic": [asdict(r) for r in synthetic],
        "analysis_growth_exponent": exponent,
        "growth_exponents": exponents,
        "analysis_superlinear": _superlinear(exponents),
    }
    write_json(args.out, result)

    print_models(rows + cases + [resnet50])
    print()
    print_resnet50(resnet50)
    print()
    print_synthetic(synthetic, exponents)
    print(f"\nwrote {args.out}")
    failed = [r.name for r in rows + cases + [resnet50] if r.error]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

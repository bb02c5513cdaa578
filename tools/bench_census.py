"""Census-Income benchmark: single-task models, torch-rechub multi-task baselines, the
plain average of trained models, and fxfuse's fused models, on the same data and the
same training budget, over several seeds.

Every model is trained with `fxfuse.train.fit` (Adam, batch 1024, at most 10 epochs,
patience 3 on the mean validation AUC) and scored on the test rows. A fused model is
built from the single-task models of the same seed, trained with its members frozen,
and compared with the plain average of exactly those members (the model it starts
as), seed by seed.

    python tools/bench_census.py                 # the full run: bench/census.{json,md}
    python tools/bench_census.py --quick         # a smoke test on a few thousand rows

Jobs run in ``--jobs`` worker processes of ``--threads`` threads each. The models are
tiny, so one thread per process and one process per core is the fastest on CPU: with
two threads, a step spends its time waiting for the other thread.
"""

from __future__ import annotations

import argparse
import concurrent.futures as futures
import json
import logging
import math
import multiprocessing
import os
import statistics
import sys
import time
import warnings
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch import nn  # noqa: E402

import fxfuse  # noqa: E402
from examples.census import baselines  # noqa: E402
from examples.census.models import TabularMLP  # noqa: E402
from fxfuse.data import Dataset, census_income  # noqa: E402
from fxfuse.files import write_text  # noqa: E402
from fxfuse.heads import weigh_heads  # noqa: E402
from fxfuse.train import TrainConfig, evaluate, fit  # noqa: E402

DEFAULT_DATA = ROOT.parent / "shared" / "data" / "census-income-kdd"
TASKS = ("income", "never_married")
PROBABILITIES = {task: "probability" for task in TASKS}

# ----------------------------------------------------------------------- settings


@dataclass(frozen=True)
class Budget:
    """The training budget every model gets (the paper's single-task protocol)."""

    epochs: int = 10
    batch_size: int = 1024
    lr: float = 1e-3
    patience: int = 3

    def config(self, seed: int, **changes) -> TrainConfig:
        """Adam (AdamW without weight decay) at `lr`, as for the paper's models."""
        settings = dict(
            epochs=self.epochs,
            batch_size=self.batch_size,
            lr=self.lr,
            weight_decay=0.0,
            patience=self.patience,
            seed=seed,
            progress=False,
        )
        settings.update(changes)
        return TrainConfig(**settings)


@dataclass(frozen=True)
class Fusion:
    """How one fused model is built and trained.

    Attributes:
        members: member kinds per task (keys of `MEMBERS`); every task gets the same.
        levels: fusion levels.
        cuts: node names to cut at, per member kind; kinds not named use fxfuse's
            plan. A kind with fewer cuts than `levels` joins the last levels.
        width, heads: AKF token width and attention heads.
        lr, schedule, weight_decay, task_weights: `TrainConfig` of the fusion fit.
        unfreeze: None, "heads" or "all" (`fxfuse.unfreeze`).
        head_start: how each task's head mixing starts (`fxfuse.heads.weigh_heads`):
            "fit" from the weights minimising its loss on validation rows (as
            `fxfuse train` does by default), "scores" from its models' validation
            scores, "uniform" from equal weights.
    """

    members: tuple[str, ...]
    levels: int = 3
    cuts: Mapping[str, Sequence[str]] = field(default_factory=dict)
    width: int = 64
    heads: int = 4
    lr: float = 1e-3
    schedule: str = "constant"
    weight_decay: float = 0.01
    task_weights: Mapping[str, float] | None = None
    unfreeze: str | None = None
    head_start: str = "fit"

    def describe(self) -> dict:
        data = asdict(self)
        data["cuts"] = {k: list(v) for k, v in self.cuts.items()}
        return data


# Member kinds: (builder, cut candidates). The builders take (sparse, dense).
MEMBERS: dict[str, Callable[[dict, list], nn.Module]] = {
    "mlp8": lambda sparse, dense: TabularMLP(sparse, dense, (8, 8), embed_dim=4),
    "mlp16": lambda sparse, dense: TabularMLP(sparse, dense, (16, 8), embed_dim=4),
    "dcn": baselines.dcn,
    "deepfm": baselines.deepfm,
}
MULTI_TASK = ("sharedbottom", "mmoe", "ple")

# The settings the tuning (bench/census_tuning.md) found best on validation rows;
# passed explicitly. The second row is the four MLPs with `fxfuse train`'s defaults
# (fitted head start, members frozen), to show what those cost or gain here.
FUSIONS: dict[str, Fusion] = {
    "fxfuse (4 MLPs)": Fusion(members=("mlp8", "mlp16"), head_start="uniform"),
    "fxfuse (4 MLPs, fitted heads)": Fusion(members=("mlp8", "mlp16")),
    "fxfuse (heterogeneous)": Fusion(
        members=("mlp8", "mlp16", "dcn", "deepfm"),
        cuts={"deepfm": ["<last>"]},
        lr=1e-4,
    ),
}

# ------------------------------------------------------------------------ helpers


def model_seed(seed: int, name: str) -> int:
    """A fixed, distinct initialisation seed per (run seed, model)."""
    return zlib.crc32(f"{seed}/{name}".encode())


def build_member(kind: str, task: str, seed: int, data: Dataset) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(model_seed(seed, f"{task}/{kind}"))
        return MEMBERS[kind](data.sparse, data.dense)


def build_multi_task(name: str, seed: int, data: Dataset) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(model_seed(seed, name))
        return baselines.multi_task(name, data.sparse, data.dense)


def count(model: nn.Module, trainable: bool = False) -> int:
    return sum(
        p.numel() for p in model.parameters() if p.requires_grad or not trainable
    )


def example_inputs(data: Dataset) -> tuple:
    return (data.train.take(slice(0, 4)).inputs,)


def resolve_cuts(
    fusion: Fusion, task_members: Mapping[str, Mapping[str, nn.Module]], data: Dataset
) -> dict[str, list[str]]:
    """`fuse`'s ``cuts`` for every fused model name; ``"<last>"`` names a model's last
    cut point (the logit of DeepFM, whose only cut point it is)."""
    cuts = {}
    for task, models in task_members.items():
        for kind, model in models.items():
            names = list(fusion.cuts.get(kind, []))
            if "<last>" in names:
                last = _last_cut(kind, model, data)
                names = [last if n == "<last>" else n for n in names]
            if names:
                cuts[f"{task}_{kind}"] = names
    return cuts


_LAST_CUTS: dict[str, str] = {}


def _last_cut(kind: str, model: nn.Module, data: Dataset) -> str:
    """The node name of a member kind's last cut point (the same for every task)."""
    if kind not in _LAST_CUTS:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            report = fxfuse.inspect(model, example_inputs(data), levels=1)
        _LAST_CUTS[kind] = report.cut_points[-1].node
    return _LAST_CUTS[kind]


def build_fused(
    fusion: Fusion, task_members: Mapping[str, Mapping[str, nn.Module]], data: Dataset
) -> torch.fx.GraphModule:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fused = fxfuse.fuse(
            {task: dict(models) for task, models in task_members.items()},
            example_inputs(data),
            levels=fusion.levels,
            cuts=resolve_cuts(fusion, task_members, data),
            width=fusion.width,
            heads=fusion.heads,
        )
    if fusion.unfreeze:
        fxfuse.unfreeze(fused, fusion.unfreeze)
    return fused


def fusion_config(fusion: Fusion, budget: Budget, seed: int) -> TrainConfig:
    return budget.config(
        seed,
        lr=fusion.lr,
        schedule=fusion.schedule,
        weight_decay=fusion.weight_decay,
        task_weights=dict(fusion.task_weights) if fusion.task_weights else None,
    )


def rows_per_second(model: nn.Module, data: Dataset, repeats: int = 3) -> float:
    """Eval-mode throughput over the whole test split at batch 8192 (best of runs)."""
    split = data.test
    model.eval()
    best = math.inf
    with torch.no_grad():
        for _ in range(repeats):
            started = time.perf_counter()
            for start in range(0, len(split), 8192):
                model(*split.take(slice(start, start + 8192)).args())
            best = min(best, time.perf_counter() - started)
    return len(split) / best


# ---------------------------------------------------------------------- the jobs

_DATA: Dataset | None = None
_MEASURE_SPEED = False  # measure throughput inside the job (only when it runs alone)


def _init_worker(
    data_root: str, quick: bool, threads: int, measure: bool = False
) -> None:
    global _DATA, _MEASURE_SPEED
    torch.set_num_threads(threads)
    logging.getLogger("fxfuse").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore")
    _DATA = load_data(data_root, quick)
    _MEASURE_SPEED = measure


def load_data(data_root: str, quick: bool) -> Dataset:
    data = census_income(data_root)
    return data.subset(6000, 3000, seed=0) if quick else data


class _Inline(futures.Executor):
    """Runs each job at once, in this process (``--jobs 1``)."""

    def submit(self, fn, /, *args, **kwargs) -> futures.Future:
        future: futures.Future = futures.Future()
        future.set_result(fn(*args, **kwargs))
        return future


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def train_member(kind: str, task: str, seed: int, budget: Budget) -> dict:
    """Train one single-task model; return its result and weights."""
    data = _DATA
    model = build_member(kind, task, seed, data)
    wrapped = baselines.SingleTask(task, model)
    result = fit(
        wrapped,
        data.train,
        data.val,
        {task: "binary"},
        budget.config(seed),
        output_kinds=PROBABILITIES,
    )
    test = evaluate(wrapped, data.test, {task: "binary"}, PROBABILITIES)
    speed = rows_per_second(wrapped, data) if _MEASURE_SPEED else None
    return {
        "speed": speed,
        "kind": kind,
        "task": task,
        "seed": seed,
        "test": test,
        "val": result.best_metrics,
        "best_epoch": result.best_epoch,
        "epochs": len(result.history),
        "seconds": result.seconds,
        "params": count(model),
        "state": _state(model),
    }


def train_multi_task(name: str, seed: int, budget: Budget) -> dict:
    data = _DATA
    model = baselines.MultiTask(TASKS, build_multi_task(name, seed, data))
    result = fit(
        model,
        data.train,
        data.val,
        data.tasks,
        budget.config(seed),
        output_kinds=PROBABILITIES,
    )
    test = evaluate(model, data.test, data.tasks, PROBABILITIES)
    speed = rows_per_second(model, data) if _MEASURE_SPEED else None
    return {
        "speed": speed,
        "name": name,
        "seed": seed,
        "test": test,
        "val": result.best_metrics,
        "best_epoch": result.best_epoch,
        "epochs": len(result.history),
        "seconds": result.seconds,
        "params": count(model),
        "state": _state(model),
    }


def load_members(
    kinds: Sequence[str], seed: int, states: Mapping[tuple, dict], data: Dataset
) -> dict[str, dict[str, nn.Module]]:
    """Trained members per task, rebuilt from their weights, in eval mode."""
    members = {}
    for task in TASKS:
        members[task] = {}
        for kind in kinds:
            model = build_member(kind, task, seed, data)
            model.load_state_dict(states[(kind, task)])
            members[task][kind] = model.eval()
    return members


def train_fused(
    name: str, fusion: Fusion, seed: int, states: dict, budget: Budget
) -> dict:
    """Fuse the seed's trained members, train the fusion, and score both the fused
    model and the plain average of the same members on the test rows.

    When the fusion unfreezes part of the members, the average it is compared with
    gets the same extra training: each member alone trains the same parameters with
    the same settings, and the average is taken over those fine-tuned members.
    """
    data = _DATA
    members = load_members(fusion.members, seed, states, data)
    plain = baselines.Average({t: list(m.values()) for t, m in members.items()})
    plain_test = evaluate(plain, data.test, data.tasks, PROBABILITIES)
    plain_val = evaluate(plain, data.val, data.tasks, PROBABILITIES)

    # The fusion modules' start depends on the seed and the fused model only, not on
    # which jobs the worker process ran before.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(model_seed(seed, name))
        fused = build_fused(fusion, members, data)
    average, average_test, average_val = plain, plain_test, plain_val
    finetune_seconds = 0.0
    if fusion.unfreeze:
        tuned, finetune_seconds = finetune_members(fused, fusion, seed, states, budget)
        average = baselines.Average({t: list(m.values()) for t, m in tuned.items()})
        average_test = evaluate(average, data.test, data.tasks, PROBABILITIES)
        average_val = evaluate(average, data.val, data.tasks, PROBABILITIES)

    if fusion.head_start != "uniform":
        weigh_heads(fused, data.val, data.tasks, method=fusion.head_start)
    result = fit(
        fused, data.train, data.val, data.tasks, fusion_config(fusion, budget, seed)
    )
    test = evaluate(fused, data.test, data.tasks)
    speed = rows_per_second(fused, data) if _MEASURE_SPEED else None
    average_speed = rows_per_second(average, data) if _MEASURE_SPEED else None
    return {
        "speed": speed,
        "average_speed": average_speed,
        "name": name,
        "seed": seed,
        "fusion": fusion.describe(),
        "test": test,
        "val": result.best_metrics,
        "initial_val": result.initial_metrics,
        "best_epoch": result.best_epoch,
        "epochs": len(result.history),
        "history": [
            {"epoch": h["epoch"], "val": h["val"], "seconds": h["seconds"]}
            for h in result.history
        ],
        "seconds": result.seconds,
        "params": count(fused),
        "trainable": count(fused, trainable=True),
        "average_test": average_test,
        "average_val": average_val,
        "average_finetune_seconds": finetune_seconds,
        "plain_average_test": plain_test,
        "plain_average_val": plain_val,
        "state": _state(fused),
    }


def finetune_members(
    fused: nn.Module, fusion: Fusion, seed: int, states: dict, budget: Budget
) -> tuple[dict[str, dict[str, nn.Module]], float]:
    """Fresh copies of the members, each trained alone on exactly the parameters
    that `fxfuse.unfreeze` made trainable in the fused model, with the fusion's
    training settings, and in eval mode as the fused model's stages are. Returns the members per task and the seconds spent."""
    data = _DATA
    members = load_members(fusion.members, seed, states, data)
    seconds = 0.0
    for task, models in members.items():
        for kind, model in models.items():
            container = fused.get_submodule(f"{task}_{kind}")
            # Stage parameters keep the model's names below "stageK.".
            unfrozen = {
                n.split(".", 1)[1]
                for n, p in container.named_parameters()
                if p.requires_grad
            }
            for n, p in model.named_parameters():
                p.requires_grad_(n in unfrozen)
            if not unfrozen:
                continue
            result = fit(
                baselines.SingleTask(task, model, keep_eval=True),
                data.train,
                data.val,
                {task: "binary"},
                fusion_config(fusion, budget, seed),
                output_kinds=PROBABILITIES,
            )
            seconds += result.seconds
            model.eval()
    return members, seconds


# -------------------------------------------------------------------- the bench


def run(
    data_root: str,
    seeds: Sequence[int],
    budget: Budget,
    fusions: Mapping[str, Fusion],
    quick: bool = False,
    jobs: int = 2,
    threads: int = 1,
) -> dict:
    """Train everything for every seed and return the results (JSON-ready)."""
    started = time.perf_counter()
    kinds = sorted(
        {k for f in fusions.values() for k in f.members}, key=list(MEMBERS).index
    )
    if jobs == 1:
        _init_worker(data_root, quick, threads, measure=True)
        pool = _Inline()
    else:
        pool = futures.ProcessPoolExecutor(
            jobs,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_init_worker,
            initargs=(data_root, quick, threads),
        )
    with pool:
        # Fused models are the longest jobs and wait for their members; start the
        # members first, then the multi-task baselines, so no worker sits idle.
        member_jobs = {
            pool.submit(train_member, kind, task, seed, budget): (seed, kind, task)
            for seed in seeds
            for kind in kinds
            for task in TASKS
        }
        multi_jobs = [
            pool.submit(train_multi_task, name, seed, budget)
            for seed in seeds
            for name in MULTI_TASK
        ]
        members: dict[int, dict[tuple, dict]] = {seed: {} for seed in seeds}
        fused_jobs = []
        for job in futures.as_completed(member_jobs):
            seed, kind, task = member_jobs[job]
            members[seed][(kind, task)] = job.result()
            _log(f"seed {seed} {task} {kind}: {members[seed][(kind, task)]['test']}")
            if len(members[seed]) == len(kinds) * len(TASKS):
                states = {key: m["state"] for key, m in members[seed].items()}
                for name, fusion in fusions.items():
                    fused_jobs.append(
                        pool.submit(train_fused, name, fusion, seed, states, budget)
                    )
        multi = [job.result() for job in multi_jobs]
        for m in multi:
            _log(f"seed {m['seed']} {m['name']}: {m['test']}")
        fused = []
        for job in futures.as_completed(fused_jobs):
            fused.append(job.result())
            _log(f"seed {fused[-1]['seed']} {fused[-1]['name']}: {fused[-1]['test']}")
    train_wall = time.perf_counter() - started

    if jobs == 1:  # measured by the jobs, each alone
        speed = _measured(seeds[0], members[seeds[0]], multi, fused)
    else:  # measured here, alone, on the first seed's models
        torch.set_num_threads(threads)
        data = load_data(data_root, quick)
        speed = _throughput(data, seeds[0], members[seeds[0]], multi, fused, fusions)
    return _results(
        members,
        multi,
        fused,
        fusions,
        speed,
        budget,
        seeds,
        quick,
        jobs,
        threads,
        train_wall,
        time.perf_counter() - started,
    )


def _measured(seed, members, multi, fused) -> dict[str, float]:
    speed = {f"{kind}/{task}": m["speed"] for (kind, task), m in members.items()}
    speed.update({m["name"]: m["speed"] for m in multi if m["seed"] == seed})
    for f in fused:
        if f["seed"] == seed:
            speed[f["name"]] = f["speed"]
            speed[f"average of {f['name']}"] = f["average_speed"]
    return speed


def _throughput(data, seed, members, multi, fused, fusions) -> dict[str, float]:
    speed = {}
    for (kind, task), m in members.items():
        model = build_member(kind, task, seed, data)
        model.load_state_dict(m["state"])
        speed[f"{kind}/{task}"] = rows_per_second(
            baselines.SingleTask(task, model), data
        )
    for m in multi:
        if m["seed"] == seed:
            model = baselines.MultiTask(TASKS, build_multi_task(m["name"], seed, data))
            model.load_state_dict(m["state"])
            speed[m["name"]] = rows_per_second(model, data)
    states = {key: m["state"] for key, m in members.items()}
    for f in fused:
        if f["seed"] != seed:
            continue
        fusion = fusions[f["name"]]
        task_members = load_members(fusion.members, seed, states, data)
        average = baselines.Average(
            {t: list(m.values()) for t, m in task_members.items()}
        )
        speed[f"average of {f['name']}"] = rows_per_second(average, data)
        model = build_fused(fusion, task_members, data)
        model.load_state_dict(f["state"])
        speed[f["name"]] = rows_per_second(model, data)
    return speed


def _log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------- reporting

MEMBER_LABELS = {
    "mlp8": "MLP [8, 8]",
    "mlp16": "MLP [16, 8]",
    "dcn": "DCN",
    "deepfm": "DeepFM",
}
MULTI_LABELS = {"sharedbottom": "Shared-Bottom", "mmoe": "MMoE", "ple": "PLE"}


def _results(
    members,
    multi,
    fused,
    fusions,
    speed,
    budget,
    seeds,
    quick,
    jobs,
    threads,
    train_wall,
    wall,
) -> dict:
    rows = []

    def row(name, kind, per_seed, seconds, trainable, total, rps, extra=None):
        rows.append(
            {
                "name": name,
                "kind": kind,
                "seeds": per_seed,
                "train_seconds": seconds,
                "trainable_params": trainable,
                "total_params": total,
                "rows_per_second": rps,
                **(extra or {}),
            }
        )

    first = seeds[0]
    kinds = sorted({k for (k, _) in members[first]}, key=list(MEMBERS).index)
    for kind in kinds:
        for task in TASKS:
            per_seed = {
                str(s): {
                    "test": members[s][(kind, task)]["test"],
                    "val": members[s][(kind, task)]["val"],
                    "best_epoch": members[s][(kind, task)]["best_epoch"],
                    "epochs": members[s][(kind, task)]["epochs"],
                }
                for s in seeds
            }
            seconds = [members[s][(kind, task)]["seconds"] for s in seeds]
            params = members[first][(kind, task)]["params"]
            row(
                f"{MEMBER_LABELS[kind]} ({task})",
                "single-task",
                per_seed,
                seconds,
                params,
                params,
                speed.get(f"{kind}/{task}"),
            )
    for name in MULTI_TASK:
        ms = sorted((m for m in multi if m["name"] == name), key=lambda m: m["seed"])
        row(
            MULTI_LABELS[name],
            "multi-task",
            {
                str(m["seed"]): {
                    k: m[k] for k in ("test", "val", "best_epoch", "epochs")
                }
                for m in ms
            },
            [m["seconds"] for m in ms],
            ms[0]["params"],
            ms[0]["params"],
            speed.get(name),
        )
    for name, fusion in fusions.items():
        fs = sorted((f for f in fused if f["name"] == name), key=lambda f: f["seed"])
        member_seconds = [
            f["average_finetune_seconds"]
            + sum(
                members[f["seed"]][(k, t)]["seconds"]
                for k in fusion.members
                for t in TASKS
            )
            for f in fs
        ]
        member_params = sum(
            members[first][(k, t)]["params"] for k in fusion.members for t in TASKS
        )
        row(
            f"average of {name.removeprefix('fxfuse ')}",
            "average",
            {
                str(f["seed"]): {"test": f["average_test"], "val": f["average_val"]}
                for f in fs
            },
            member_seconds,
            0,
            member_params,
            speed.get(f"average of {name}"),
        )
        row(
            name,
            "fused",
            {
                str(f["seed"]): {
                    "test": f["test"],
                    "val": f["val"],
                    "initial_val": f["initial_val"],
                    "best_epoch": f["best_epoch"],
                    "epochs": f["epochs"],
                    "history": f["history"],
                    "difference": {
                        t: f["test"][t] - f["average_test"][t] for t in TASKS
                    }
                    | {"mean": _mean(f["test"]) - _mean(f["average_test"])},
                }
                for f in fs
            },
            [f["seconds"] for f in fs],
            fs[0]["trainable"],
            fs[0]["params"],
            speed.get(name),
            {"fusion": fusion.describe(), "member_train_seconds": member_seconds},
        )
    for r in rows:
        r["summary"] = _summary(r["seeds"])
    return {
        "protocol": {
            "data": "Census-Income (KDD), full"
            if not quick
            else "Census-Income, 6000/3000/3000 rows (quick)",
            "seeds": list(seeds),
            "budget": asdict(budget),
            "optimizer": "Adam (AdamW, weight decay 0) for models; fusion as listed",
            "early_stopping": "mean validation AUC",
            "jobs": jobs,
            "threads_per_job": threads,
            "quick": quick,
        },
        "rows": rows,
        "train_wall_seconds": train_wall,
        "wall_seconds": wall,
        "versions": {"torch": torch.__version__, "fxfuse": fxfuse.__version__},
        "load_average_at_end": round(os.getloadavg()[0], 2),
    }


def _mean(metrics: Mapping[str, float]) -> float:
    return sum(metrics.values()) / len(metrics)


def _stats(values: Sequence[float]) -> dict:
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "values": list(values),
    }


def _summary(per_seed: Mapping[str, dict]) -> dict:
    seeds = list(per_seed.values())
    tasks = list(seeds[0]["test"])
    summary = {t: _stats([s["test"][t] for s in seeds]) for t in tasks}
    if len(tasks) > 1:
        summary["mean"] = _stats([_mean(s["test"]) for s in seeds])
    if "difference" in seeds[0]:
        summary["difference"] = {
            k: _stats([s["difference"][k] for s in seeds])
            for k in seeds[0]["difference"]
        }
    return summary


def _cell(stats: dict | None, digits: int = 4, sign: str = "") -> str:
    if stats is None:
        return ""
    if len(stats["values"]) == 1:
        return f"{stats['mean']:{sign}.{digits}f}"
    return f"{stats['mean']:{sign}.{digits}f} ± {stats['std']:.{digits}f}"


# What the fused models should reach. A fused model starts as the average of its
# members, so the bar that tells whether fusion helps is that average, seed by seed.
PAIRED_GAIN = {
    name: {"mean": 0.0004, "income": 0.0008}
    for name in ("fxfuse (4 MLPs)", "fxfuse (4 MLPs, fitted heads)")
}
ABSOLUTE = {"fxfuse (heterogeneous)": {"mean": 0.9735, "income": 0.952}}


def goals(results: dict) -> list[dict]:
    """Each goal with whether the results reach it and the numbers that decide it.

    1. Every fused model: mean test AUC above every multi-task baseline's, and on
       each task above each of its own members (means over seeds).
    2. `PAIRED_GAIN`: fused minus plain average of the same members, on every seed
       and on the mean over seeds.
    3. `ABSOLUTE`: mean over seeds at least these AUCs.
    """
    rows = {r["name"]: r for r in results["rows"]}
    baselines = [r for r in results["rows"] if r["kind"] == "multi-task"]
    found = []
    for r in results["rows"]:
        if r["kind"] != "fused":
            continue
        name, s = r["name"], r["summary"]
        best_baseline = max(baselines, key=lambda b: b["summary"]["mean"]["mean"])
        member_rows = [
            rows[f"{MEMBER_LABELS[k]} ({t})"]
            for k in r["fusion"]["members"]
            for t in TASKS
        ]
        worst_margin = min(
            s[t]["mean"] - m["summary"][t]["mean"]
            for m in member_rows
            for t in m["summary"]
        )
        margin = s["mean"]["mean"] - best_baseline["summary"]["mean"]["mean"]
        found.append(
            {
                "goal": f"{name}: mean AUC above every multi-task baseline, and "
                "above each of its members on each task",
                "reached": margin > 0 and worst_margin > 0,
                "measured": f"{margin:+.4f} vs the best baseline "
                f"({best_baseline['name']}), {worst_margin:+.5f} vs its closest "
                "member",
            }
        )
        for key, gain in PAIRED_GAIN.get(name, {}).items():
            per_seed = [v["difference"][key] for v in r["seeds"].values()]
            found.append(
                {
                    "goal": f"{name}: {key} AUC at least {gain:+.4f} above the "
                    "plain average of its members, on every seed and on average",
                    "reached": min(per_seed) >= gain
                    and statistics.fmean(per_seed) >= gain,
                    "measured": "per seed "
                    + ", ".join(f"{d:+.4f}" for d in per_seed)
                    + f"; mean {statistics.fmean(per_seed):+.4f}",
                }
            )
        for key, bar in ABSOLUTE.get(name, {}).items():
            value = s[key]["mean"]
            found.append(
                {
                    "goal": f"{name}: {key} AUC at least {bar:.4f}",
                    "reached": value >= bar,
                    "measured": f"{value:.4f}",
                }
            )
    return found


def markdown(results: dict) -> str:
    p = results["protocol"]
    lines = [
        "# Census-Income benchmark",
        "",
        f"{p['data']}; seeds {', '.join(map(str, p['seeds']))}; every model trained with "
        f"`fxfuse.train.fit`, batch {p['budget']['batch_size']}, at most "
        f"{p['budget']['epochs']} epochs, patience {p['budget']['patience']} on the mean "
        "validation AUC. Test AUC as mean ± std over seeds. Training time: seconds of "
        f"`fit` per model ({p['jobs']} worker process(es) of {p['threads_per_job']} "
        "thread(s) in parallel); for a fused model, fusion training only (its members' "
        "time is in the average's row). Inference: eval mode, batch 8192, whole test "
        "split, one process of "
        f"{p['threads_per_job']} thread(s). Generated by `tools/bench_census.py`.",
        "",
        "| model | income AUC | never married AUC | mean AUC | train s | trainable params | total params | rows/s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results["rows"]:
        s = r["summary"]
        if r["kind"] == "single-task":
            task = next(iter(s))
            aucs = [_cell(s[task]) if t == task else "" for t in TASKS] + [""]
        else:
            aucs = [_cell(s[t]) for t in TASKS] + [_cell(s["mean"])]
        name = f"**{r['name']}**" if r["kind"] == "fused" else r["name"]
        rps = f"{r['rows_per_second']:,.0f}" if r["rows_per_second"] else ""
        lines.append(
            f"| {name} | {' | '.join(aucs)} | {statistics.fmean(r['train_seconds']):.0f} "
            f"| {r['trainable_params']:,} | {r['total_params']:,} | {rps} |"
        )
    lines += [
        "",
        "## Fused minus plain average, paired by seed",
        "",
        "Each fused model against the plain average of the same trained members "
        "(same seed): test AUC differences. Where a fused model unfreezes its "
        "members' last stages, its average is over the same members each fine-tuned "
        "alone on those stages with the same settings.",
        "",
        "| fused model | seed | income | never married | mean |",
        "|---|---|---|---|---|",
    ]
    for r in results["rows"]:
        if r["kind"] != "fused":
            continue
        for seed, s in r["seeds"].items():
            d = s["difference"]
            lines.append(
                f"| {r['name']} | {seed} | {d['income']:+.4f} | {d['never_married']:+.4f} "
                f"| {d['mean']:+.4f} |"
            )
        d = r["summary"]["difference"]
        lines.append(
            f"| {r['name']} | mean ± std | {_cell(d['income'], sign='+')} | "
            f"{_cell(d['never_married'], sign='+')} | {_cell(d['mean'], sign='+')} |"
        )
    lines += ["", "## Goals", ""]
    lines += [
        f"- {g['goal']}: **{'reached' if g['reached'] else 'not reached'}** "
        f"({g['measured']})"
        for g in goals(results)
    ]
    lines += [
        "",
        f"Wall time: {results['wall_seconds'] / 60:.1f} min in all "
        f"({results['train_wall_seconds'] / 60:.1f} min of training); load "
        f"average {results.get('load_average_at_end', float('nan')):.1f} at the end.",
        "",
    ]
    return "\n".join(lines)


def write_atomic(path: Path, text: str) -> None:
    write_text(path, text)


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", default=str(DEFAULT_DATA))
    parser.add_argument(
        "--out",
        default=str(ROOT / "bench" / "census"),
        help="output path without suffix: OUT.json and OUT.md",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="6000 training rows, 1 epoch of batch 128 at lr 5e-3, seed 0: a smoke test",
    )
    parser.add_argument("--seeds", type=int, nargs="+")
    parser.add_argument("--jobs", type=int, default=2, help="worker processes")
    parser.add_argument("--threads", type=int, default=1, help="threads per process")
    args = parser.parse_args(argv)

    seeds = args.seeds or ([0] if args.quick else [0, 1, 2])
    budget = Budget(epochs=1, batch_size=128, lr=5e-3) if args.quick else Budget()
    results = run(
        args.data_root, seeds, budget, FUSIONS, args.quick, args.jobs, args.threads
    )
    out = Path(args.out)
    write_atomic(out.with_suffix(".json"), json.dumps(results, indent=1))
    write_atomic(out.with_suffix(".md"), markdown(results))
    _log(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')}")
    return results


if __name__ == "__main__":
    main()

"""Fit the trainable part of a multi-task model: AKF modules and head mixers.

`fit` trains every parameter that requires a gradient with AdamW, one loss per task
chosen from the task's kind and from whether the model predicts probabilities or
logits. After each epoch it scores the validation rows (`fxfuse.metrics`), logs one
JSON line, keeps the best weights and stops early when the mean score no longer
improves. The frozen stages of a fused model have no trainable parameter and stay in
eval mode, so training leaves them exactly as they were.

Runs are reproducible and resumable: batches come from a permutation seeded with
``seed + epoch``, and a checkpoint holds everything the next step depends on, so a run
interrupted at any step and resumed ends with the weights of an uninterrupted run.

Under ``torchrun`` (``WORLD_SIZE`` > 1) the same call trains with
DistributedDataParallel: every rank takes a disjoint, equal share of each batch, so
the gradient of a step is the gradient of the whole batch whatever the number of
ranks. Rank 0 scores the validation rows and writes logs and checkpoints; every rank
follows its decisions.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import signal
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from .data._split import Split
from .errors import FxfuseError, InputError
from .files import write_atomically, write_text
from .metrics import KINDS, OUTPUT_KINDS, flat_prediction, mean_score, task_metric

__all__ = ["FitResult", "TrainConfig", "evaluate", "fit", "loss_for", "predict"]

logger = logging.getLogger("fxfuse")

CHECKPOINT = "last.pt"
DONE = "done.json"
_CHECKPOINT_FORMAT = 1
_EPS = 1e-7

# Settings that change the weights a run ends with: resuming with other values
# cannot reproduce the interrupted run.
_TRAJECTORY_SETTINGS = (
    "epochs",
    "batch_size",
    "lr",
    "weight_decay",
    "patience",
    "seed",
    "max_steps",
    "task_weights",
    "schedule",
)


@dataclass
class TrainConfig:
    """Settings of `fit`.

    Attributes:
        epochs: Most passes over the training rows.
        batch_size: Rows per optimizer step, over all ranks together.
        lr: AdamW learning rate (the peak, with the cosine schedule).
        weight_decay: AdamW decoupled weight decay.
        patience: Epochs without improvement of the mean validation score after
            which training stops.
        seed: Seeds the global RNG (dropout) and, with the epoch, the batch order.
        eval_batch_size: Rows per forward pass when scoring.
        max_steps: Most optimizer steps per epoch, for quick runs; None for all.
        task_weights: Weight of each task's loss in the sum (default 1 each).
        schedule: ``"constant"``, or ``"cosine"`` from `lr` to 0 over all steps.
        progress: Show a progress bar on stderr.
        checkpoint_every: Optimizer steps between checkpoints inside an epoch.
    """

    epochs: int = 10
    batch_size: int = 1024
    lr: float = 1e-3
    weight_decay: float = 0.01
    patience: int = 3
    seed: int = 0
    eval_batch_size: int = 8192
    max_steps: int | None = None
    task_weights: dict[str, float] | None = None
    schedule: str = "constant"
    progress: bool = True
    checkpoint_every: int = 200

    def __post_init__(self) -> None:
        if self.schedule not in ("constant", "cosine"):
            raise FxfuseError(
                f"schedule '{self.schedule}' is unknown; use 'constant' or 'cosine'"
            )
        at_least_one = (
            "epochs",
            "batch_size",
            "patience",
            "eval_batch_size",
            "checkpoint_every",
        )
        for name in at_least_one:
            if getattr(self, name) < 1:
                raise FxfuseError(
                    f"{name} must be at least 1, not {getattr(self, name)}"
                )
        if self.max_steps is not None and self.max_steps < 1:
            raise FxfuseError(f"max_steps must be at least 1, not {self.max_steps}")
        if not (math.isfinite(self.lr) and self.lr >= 0):
            raise FxfuseError(f"lr must be a finite number, 0 or more, not {self.lr}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise FxfuseError(
                f"weight_decay must be a finite number, 0 or more, not "
                f"{self.weight_decay}"
            )


@dataclass
class FitResult:
    """What `fit` did.

    Attributes:
        best_epoch: The epoch whose weights the model holds now; 0 when no epoch
            improved on the model as it was given.
        best_score: Mean validation score at `best_epoch` (`metrics.mean_score`).
        best_metrics: Validation metric per task at `best_epoch`.
        history: One entry per epoch trained, as logged.
        stopped_early: Whether the patience ran out before the last epoch.
        seconds: Training time, summed over interrupted and resumed parts.
        initial_metrics: Validation metrics of the model before training.
        initial_score: Mean validation score before training.
    """

    best_epoch: int
    best_score: float
    best_metrics: dict[str, float]
    history: list[dict]
    stopped_early: bool
    seconds: float
    initial_metrics: dict[str, float] = field(default_factory=dict)
    initial_score: float = math.nan

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping) -> FitResult:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


# Losses


def loss_for(kind: str, output_kind: str) -> Callable[[Tensor, Tensor], Tensor]:
    """The training loss of one task, as ``loss(prediction, labels)``.

    Args:
        kind: ``"binary"``, ``"multiclass"`` or ``"regression"``.
        output_kind: ``"probability"`` when the model ends in a sigmoid or softmax,
            ``"logits"`` otherwise; it does not matter for regression.

    Returns:
        Binary: binary cross-entropy on probabilities (clamped to
        ``[1e-7, 1 - 1e-7]``) or on logits. Multi-class: negative log-likelihood of
        the log probabilities, or cross-entropy on logits. Regression: mean squared
        error. Binary and regression predictions may be ``[B]`` or ``[B, 1]``.
    """
    if kind not in KINDS:
        raise InputError(f"task kind '{kind}' is unknown; use one of {KINDS}")
    if output_kind not in OUTPUT_KINDS:
        raise InputError(
            f"output kind '{output_kind}' is unknown; use one of {OUTPUT_KINDS}"
        )
    if kind == "regression":
        return _squared_error
    if kind == "binary":
        return _bce_of_probabilities if output_kind == "probability" else _bce_of_logits
    if output_kind == "probability":
        return _nll_of_probabilities
    return _cross_entropy


def _bce_of_probabilities(prediction: Tensor, labels: Tensor) -> Tensor:
    probability = flat_prediction(prediction, len(labels)).clamp(_EPS, 1 - _EPS)
    return F.binary_cross_entropy(probability, labels.to(probability.dtype))


def _bce_of_logits(prediction: Tensor, labels: Tensor) -> Tensor:
    logits = flat_prediction(prediction, len(labels))
    return F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype))


def _nll_of_probabilities(prediction: Tensor, labels: Tensor) -> Tensor:
    return F.nll_loss(prediction.clamp_min(_EPS).log(), labels.long())


def _cross_entropy(prediction: Tensor, labels: Tensor) -> Tensor:
    return F.cross_entropy(prediction, labels.long())


def _squared_error(prediction: Tensor, labels: Tensor) -> Tensor:
    value = flat_prediction(prediction, len(labels))
    return F.mse_loss(value, labels.to(value.dtype))


# Prediction and evaluation


def predict(
    model: nn.Module, split: Split, batch_size: int = 8192
) -> dict[str, Tensor]:
    """The model's predictions for every row of `split`, in eval mode.

    Args:
        model: A model whose call returns ``{task: prediction}``.
        split: The rows; they are moved to the model's device batch by batch.
        batch_size: Rows per forward pass.

    Returns:
        Task name to its predictions for all rows, on the CPU. The model's
        training mode is restored afterwards.
    """
    device = _device_of(model)
    was_training = model.training
    model.eval()
    parts: dict[str, list[Tensor]] = {}
    try:
        with torch.no_grad():
            for start in range(0, len(split), batch_size):
                batch = _to_device(split.take(slice(start, start + batch_size)), device)
                for task, value in _outputs(model(*batch.args())).items():
                    parts.setdefault(task, []).append(value.cpu())
    finally:
        model.train(was_training)
    return {task: torch.cat(values) for task, values in parts.items()}


def evaluate(
    model: nn.Module,
    split: Split,
    tasks: Mapping[str, str] | Sequence[str],
    output_kinds: Mapping[str, str] | None = None,
    batch_size: int = 8192,
) -> dict[str, float]:
    """Each task's metric on `split`: AUC, accuracy or RMSE by the task's kind.

    Args:
        model: A model whose call returns ``{task: prediction}``.
        split: Rows with a label for every task in `tasks`.
        tasks: Task name to its kind (a `Dataset`'s ``tasks``), or task names
            alone, whose kinds are then read from the model (`infer_kinds`).
        output_kinds: Task name to ``"probability"`` or ``"logits"``; defaults to
            what the fused model records, else ``"logits"``.
        batch_size: Rows per forward pass.
    """
    tasks = _kinds_of(model, tasks, split)
    _check_tasks(tasks, {"": split})
    check_kinds(model, split, tasks)
    kinds = _output_kinds(model, tasks, output_kinds)
    predictions = predict(model, split, batch_size)
    metrics = {}
    for task, kind in tasks.items():
        if task not in predictions:
            raise InputError(
                f"the model predicts {sorted(predictions)} but not task '{task}'; "
                "evaluate the tasks the model was fused for"
            )
        try:
            metrics[task] = task_metric(
                kind, predictions[task], split.labels[task], kinds[task]
            )
        except InputError as error:
            raise InputError(f"task '{task}': {error}") from None
    return metrics


def infer_kinds(model: nn.Module, tasks: Sequence[str], split: Split) -> dict[str, str]:
    """Each task's kind, read from the model's prediction for it.

    Several values per row make a multi-class task; one value that is a
    probability (the head ends in a sigmoid) a binary one. One raw value per row
    could be either a binary logit or a regression, so the labels decide: all 0
    and 1 make it binary, anything else regression.

    Example::

        infer_kinds(fused, ["income", "never_married"], data.val)
        # {"income": "binary", "never_married": "binary"}
    """
    predictions = _outputs(check_fits(model, split))
    kinds = {}
    for task in tasks:
        if task not in predictions:
            raise InputError(
                f"the model predicts {sorted(predictions)} but not task '{task}'"
            )
        prediction = predictions[task]
        per_row = prediction.numel() // max(len(prediction), 1)
        labels = split.labels.get(task)
        if per_row > 1:
            kinds[task] = "multiclass"
        elif _output_kinds(model, [task], None)[task] == "probability":
            kinds[task] = "binary"
        elif labels is not None and bool(((labels == 0) | (labels == 1)).all()):
            kinds[task] = "binary"
        else:
            kinds[task] = "regression"
    return kinds


def check_kinds(model: nn.Module, split: Split, tasks: Mapping[str, str]) -> None:
    """Raise an InputError if a task's kind does not fit the model's prediction
    for it: a multi-class task needs several values per row, the others one."""
    predictions = _outputs(check_fits(model, split))
    for task, kind in tasks.items():
        prediction = predictions.get(task)
        if prediction is None:
            continue  # reported with the list of predicted tasks where it matters
        per_row = prediction.numel() // max(len(prediction), 1)
        if kind == "multiclass" and per_row < 2:
            raise InputError(
                f"task '{task}' is multiclass but the model predicts one value per "
                "row; give it the kind binary or regression (--task-kind)"
            )
        if kind != "multiclass" and per_row > 1:
            raise InputError(
                f"task '{task}' is {kind} but the model predicts {per_row} values per "
                "row; give it the kind multiclass (--task-kind)"
            )


def check_fits(model: nn.Module, split: Split):
    """Run `model` in eval mode on two rows of `split` and return its output;
    raise an InputError if the rows do not fit it.

    The message names the inputs the data give and, for a fused model, the inputs
    it was built with.
    """
    from .analyse import describe_inputs

    rows = _to_device(split.take(slice(0, 2)), _device_of(model))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return model(*rows.args())
    except Exception as error:
        built = getattr(model, "example_inputs", None)
        expected = f"; it was built for {describe_inputs(built)}" if built else ""
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise InputError(
            f"the data ({describe_inputs(rows.args())}) do not fit the model"
            f"{expected} ({first[:200]}); use the data set the model was made for"
        ) from None
    finally:
        model.train(was_training)


# Training


def fit(
    model: nn.Module,
    train: Split,
    val: Split,
    tasks: Mapping[str, str] | Sequence[str],
    config: TrainConfig | None = None,
    *,
    output_kinds: Mapping[str, str] | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
    metrics_path: str | os.PathLike | None = None,
    restart: bool = False,
) -> FitResult:
    """Train a multi-task model and leave it holding its best validation weights.

    Args:
        model: A model whose call ``model(*split.args())`` returns
            ``{task: prediction}``, e.g. from `fxfuse.fuse`. Only parameters with
            ``requires_grad`` are trained.
        train: Rows to fit on.
        val: Rows to score after every epoch.
        tasks: Task name to kind; only these tasks are trained and scored. Task
            names alone (a list) have their kinds read from the model's heads
            and the labels (`infer_kinds`).
        config: Settings; `TrainConfig()` when None.
        output_kinds: Task name to ``"probability"`` or ``"logits"``, which picks
            the loss. Defaults to ``model.fusion_info.output_kind(task)`` for a
            fused model, else ``"logits"``.
        checkpoint_dir: Folder for ``last.pt`` (written after every epoch, every
            ``checkpoint_every`` steps and on Ctrl-C) and ``done.json`` (written
            at the end). A run started with a folder holding ``last.pt`` resumes
            from it; one holding ``done.json`` loads the final weights and returns
            the stored result without training.
        restart: Discard what `checkpoint_dir` holds and start anew (rank 0
            empties it while the other ranks wait).
        metrics_path: File that receives one JSON line per epoch. It is rewritten
            at the start to hold the lines of the epochs already done (none unless
            resuming), so it always matches the run's history.

    Returns:
        The best epoch, its score and metrics, and the history of the run.

    Raises:
        InputError: a task has no labels, no prediction or an unknown kind.
        FxfuseError: the model has nothing to train, or the checkpoint belongs to
            another model or other tasks.

    Example:
        Fit the AKF modules of a fused model on a data set::

            data = fxfuse.data.census_income(...)
            result = fit(fused, data.train, data.val, data.tasks,
                         TrainConfig(epochs=5), checkpoint_dir="runs/census")
            print(result.best_epoch, result.best_metrics)

    Limitations:
        Under DDP with a model that is not a fused model, every trainable parameter
        must receive a gradient from the trained tasks' losses in every step.
    """
    started = time.perf_counter()
    config = config or TrainConfig()
    tasks = _kinds_of(model, tasks, train)
    _check_tasks(tasks, {"train": train, "val": val})
    check_kinds(model, val, tasks)
    kinds = _output_kinds(model, tasks, output_kinds)
    losses = {task: loss_for(kind, kinds[task]) for task, kind in tasks.items()}
    weights = _task_weights(config, tasks)
    folder = Path(checkpoint_dir) if checkpoint_dir is not None else None

    if folder is not None and (folder / DONE).is_file() and not restart:
        return _finished_run(model, folder, tasks, config, _rows(train, val))

    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise FxfuseError(
            "the model has no parameter that requires a gradient, so there is "
            "nothing to train; unfreeze part of it (fxfuse.unfreeze)"
        )
    ranks = _Ranks.join()
    try:
        if restart and folder is not None:
            ranks.clear(folder)
        device = ranks.place(model)
        optimizer = torch.optim.AdamW(
            trainable, lr=config.lr, weight_decay=config.weight_decay
        )
        steps_per_epoch = _steps_per_epoch(len(train), config, ranks.world)
        torch.manual_seed(config.seed)

        run = _load_checkpoint(
            folder, model, optimizer, tasks, config, _rows(train, val)
        )
        if run is None:
            initial = _validate(model, val, tasks, kinds, config, ranks)
            run = _Run.start(model, initial, mean_score(initial, tasks))
            logger.info("initial validation: %s", json.dumps(_rounded(initial)))
        if ranks.rank == 0 and metrics_path is not None:
            _write_lines(Path(metrics_path), run.history)

        network = ranks.wrap(model, model_tasks=_fused_tasks(model), trained=tasks)
        context = _Context(
            model=model,
            network=network,
            optimizer=optimizer,
            train=train,
            val=val,
            tasks=tasks,
            output_kinds=kinds,
            losses=losses,
            weights=weights,
            config=config,
            ranks=ranks,
            device=device,
            steps_per_epoch=steps_per_epoch,
            folder=folder,
            metrics_path=metrics_path,
            started=started,
            elapsed_before=run.elapsed,
        )
        try:
            _train(context, run)
        except KeyboardInterrupt:
            if ranks.rank == 0 and folder is not None:
                _save_checkpoint(folder, context, run)
                logger.info(
                    "interrupted at epoch %d step %d; saved %s",
                    run.epoch,
                    run.step,
                    folder / CHECKPOINT,
                )
            raise

        model.load_state_dict(run.best_state)
        run.elapsed = context.elapsed()
        result = run.result()
        if ranks.rank == 0 and folder is not None:
            _save_checkpoint(folder, context, run)
            done = {"tasks": tasks, "rows": _rows(train, val), **result.to_json()}
            _write_json(folder / DONE, done)
        return result
    finally:
        ranks.leave()


@dataclass
class _Context:
    """What every step of one `fit` call needs; fixed for the call."""

    model: nn.Module
    network: nn.Module
    optimizer: torch.optim.Optimizer
    train: Split
    val: Split
    tasks: dict[str, str]
    output_kinds: dict[str, str]
    losses: dict[str, Callable[[Tensor, Tensor], Tensor]]
    weights: dict[str, float]
    config: TrainConfig
    ranks: _Ranks
    device: torch.device
    steps_per_epoch: int
    folder: Path | None
    metrics_path: str | os.PathLike | None
    started: float  # time.perf_counter() when this call began
    elapsed_before: float  # seconds spent by interrupted earlier calls

    def elapsed(self) -> float:
        """Seconds of the run so far, over this and earlier calls."""
        return self.elapsed_before + time.perf_counter() - self.started


@dataclass
class _Run:
    """Where a run stands; everything here goes into the checkpoint."""

    best_state: dict[str, Tensor]
    best_score: float
    best_metrics: dict[str, float]
    initial_metrics: dict[str, float]
    initial_score: float
    epoch: int = 1  # the epoch in progress, counted from 1
    step: int = 0  # optimizer steps done in this epoch
    global_step: int = 0
    loss_sum: float = 0.0  # this rank's sum of step losses in this epoch
    best_epoch: int = 0
    bad_epochs: int = 0
    history: list[dict] = field(default_factory=list)
    elapsed: float = 0.0
    stopped: bool = False

    @classmethod
    def start(cls, model: nn.Module, metrics: dict[str, float], score: float) -> _Run:
        return cls(
            best_state=_copy_state(model),
            best_score=score,
            best_metrics=dict(metrics),
            initial_metrics=dict(metrics),
            initial_score=score,
        )

    def progress(self) -> dict:
        """The plain (non-tensor) part of the run, for the checkpoint."""
        state = asdict(self)
        del state["best_state"]
        return state

    def result(self) -> FitResult:
        return FitResult(
            best_epoch=self.best_epoch,
            best_score=self.best_score,
            best_metrics=dict(self.best_metrics),
            history=list(self.history),
            stopped_early=self.stopped,
            seconds=self.elapsed,
            initial_metrics=dict(self.initial_metrics),
            initial_score=self.initial_score,
        )


def _train(context: _Context, run: _Run) -> None:
    """Epochs from where `run` stands until the last one or early stopping."""
    config = context.config
    while run.epoch <= config.epochs and not run.stopped:
        epoch_started = time.perf_counter()
        _train_epoch(context, run)
        train_loss = context.ranks.mean(run.loss_sum, run.step, context.device)

        metrics = _validate(
            context.model,
            context.val,
            context.tasks,
            context.output_kinds,
            config,
            context.ranks,
        )
        score = mean_score(metrics, context.tasks)
        if score > run.best_score:
            run.best_score, run.best_epoch = score, run.epoch
            run.best_metrics = dict(metrics)
            run.best_state = _copy_state(context.model)
            run.bad_epochs = 0
        else:
            run.bad_epochs += 1
        line = {
            "epoch": run.epoch,
            "train_loss": train_loss,
            "val": metrics,
            "val_score": score,
            "lr": context.optimizer.param_groups[0]["lr"],
            "seconds": round(time.perf_counter() - epoch_started, 3),
        }
        run.history.append(line)
        run.stopped = run.bad_epochs >= config.patience and run.epoch < config.epochs
        run.epoch, run.step, run.loss_sum = run.epoch + 1, 0, 0.0

        if context.ranks.rank == 0:
            if context.folder is not None:
                _save_checkpoint(context.folder, context, run)
            if context.metrics_path is not None:
                _append_line(Path(context.metrics_path), line)
        logger.info(json.dumps(line))
        if run.stopped:
            logger.info(
                "no improvement in %d epochs; stopping (best epoch %d)",
                run.bad_epochs,
                run.best_epoch,
            )


def _train_epoch(context: _Context, run: _Run) -> None:
    """The remaining optimizer steps of the epoch in progress."""
    config, ranks = context.config, context.ranks
    batches = _epoch_batches(
        len(context.train), config, run.epoch, ranks.rank, ranks.world
    )[: context.steps_per_epoch]
    total_steps = context.steps_per_epoch * config.epochs
    bar = tqdm(
        total=len(batches),
        initial=run.step,
        desc=f"epoch {run.epoch}/{config.epochs}",
        unit="step",
        leave=False,
        file=sys.stderr,
        disable=not config.progress or ranks.rank != 0,
    )
    context.network.train()
    with bar:
        for index in batches[run.step :]:
            batch = _to_device(context.train.take(index), context.device)
            predictions = _outputs(context.network(*batch.args()))
            loss = _total_loss(context, predictions, batch.labels)
            context.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            value = loss.item()
            if not math.isfinite(value):
                raise FxfuseError(
                    f"the training loss is {value} at epoch {run.epoch}, step "
                    f"{run.step + 1}; no weights of this step were kept. Lower the "
                    "learning rate (--lr) and run again with --restart, which also "
                    "drops the checkpoints of the epochs before it"
                )

            # An interrupt between the weight update and the counters would leave
            # a checkpoint that repeats or skips a step.
            with _interrupts_deferred():
                _set_lr(context.optimizer, _lr(config, run.global_step, total_steps))
                context.optimizer.step()
                run.step += 1
                run.global_step += 1
                run.loss_sum += value

            bar.update()
            bar.set_postfix(loss=f"{value:.4f}", refresh=False)
            if (
                context.folder is not None
                and ranks.rank == 0
                and run.global_step % config.checkpoint_every == 0
                and run.step < len(batches)
            ):
                _save_checkpoint(context.folder, context, run)


def _total_loss(
    context: _Context, predictions: Mapping[str, Tensor], labels: Mapping[str, Tensor]
) -> Tensor:
    total = None
    for task in context.tasks:
        if task not in predictions:
            raise InputError(
                f"the model predicts {sorted(predictions)} but not task '{task}'; "
                "train the tasks the model was fused for"
            )
        term = context.weights[task] * context.losses[task](
            predictions[task], labels[task]
        )
        total = term if total is None else total + term
    return total


def _validate(
    model: nn.Module,
    val: Split,
    tasks: dict[str, str],
    output_kinds: dict[str, str],
    config: TrainConfig,
    ranks: _Ranks,
) -> dict[str, float]:
    """Validation metrics, computed on rank 0 and shared with every rank."""
    metrics = None
    if ranks.rank == 0:
        metrics = evaluate(model, val, tasks, output_kinds, config.eval_batch_size)
    return ranks.share(metrics)


# Batches and schedule


def _epoch_batches(
    rows: int, config: TrainConfig, epoch: int, rank: int, world: int
) -> list[Tensor]:
    """This rank's row indices for each step of `epoch`.

    Every rank draws the same permutation (seeded with ``seed + epoch``), cuts it
    into batches of ``batch_size`` and takes every ``world``-th row of each batch
    from its rank on. A last batch is cut to a multiple of ``world`` rows, so all
    ranks take equal shares; at most ``world - 1`` rows sit out an epoch.
    """
    generator = torch.Generator().manual_seed(config.seed + epoch)
    order = torch.randperm(rows, generator=generator)
    batches = []
    for start in range(0, rows, config.batch_size):
        chunk = order[start : start + config.batch_size]
        usable = len(chunk) - len(chunk) % world
        if usable:
            batches.append(chunk[rank:usable:world])
    return batches


def _steps_per_epoch(rows: int, config: TrainConfig, world: int) -> int:
    if config.batch_size < world:
        raise FxfuseError(
            f"batch size {config.batch_size} is smaller than the {world} ranks; "
            "give each rank at least one row per step (--batch-size, or batch_size "
            "in TrainConfig)"
        )
    full, rest = divmod(rows, config.batch_size)
    steps = full + (rest >= world)
    if steps == 0:
        raise InputError("the training split has no rows; give it some")
    return min(steps, config.max_steps or steps)


def _lr(config: TrainConfig, step: int, total_steps: int) -> float:
    """Learning rate of optimizer step `step` (counted from 0 over the run)."""
    if config.schedule == "constant":
        return config.lr
    return config.lr * 0.5 * (1 + math.cos(math.pi * step / total_steps))


def _set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


# Checkpoints


def _save_checkpoint(folder: Path, context: _Context, run: _Run) -> None:
    """Write ``last.pt`` atomically; it holds tensors and plain values only."""
    run.elapsed = context.elapsed()
    checkpoint = {
        "format": _CHECKPOINT_FORMAT,
        "tasks": dict(context.tasks),
        "rows": _rows(context.train, context.val),
        "config": asdict(context.config),
        "model": context.model.state_dict(),
        "optimizer": context.optimizer.state_dict(),
        "run": run.progress(),
        "best_state": run.best_state,
        "rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    folder.mkdir(parents=True, exist_ok=True)
    write_atomically(folder / CHECKPOINT, lambda path: torch.save(checkpoint, path))


def _load_checkpoint(
    folder: Path | None,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    tasks: dict[str, str],
    config: TrainConfig,
    rows: dict[str, int],
) -> _Run | None:
    """Restore model, optimizer, RNG and run from ``last.pt``; None if absent."""
    if folder is None or not (folder / CHECKPOINT).is_file():
        return None
    path = folder / CHECKPOINT
    checkpoint = _read_record(
        path, lambda: torch.load(path, map_location="cpu", weights_only=True)
    )
    _check_same_run(path, checkpoint, tasks, rows)
    changed = _changed_settings(checkpoint, config)
    if changed:
        warnings.warn(
            f"resuming {path} with other settings ({', '.join(changed)}); the run "
            "will not end as the interrupted one would have",
            stacklevel=3,
        )
    with _checkpoint_of_this_model(path):
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
    torch.set_rng_state(checkpoint["rng"])
    if checkpoint["cuda_rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(checkpoint["cuda_rng"])
    run = _Run(best_state=checkpoint["best_state"], **checkpoint["run"])
    logger.info("resuming %s at epoch %d step %d", path, run.epoch, run.step)
    return run


def _changed_settings(checkpoint: dict, config: TrainConfig) -> list[str]:
    """The settings of `config` that change the weights a run ends with and differ
    from those the checkpoint was trained with."""
    stored = checkpoint.get("config", {})
    return [n for n in _TRAJECTORY_SETTINGS if stored.get(n) != getattr(config, n)]


def _finished_run(
    model: nn.Module,
    folder: Path,
    tasks: dict[str, str],
    config: TrainConfig,
    rows: dict[str, int],
) -> FitResult:
    """The stored result of a finished run, with its final weights loaded."""
    done = _read_record(folder / DONE, lambda: json.loads((folder / DONE).read_text()))
    _check_same_run(folder / DONE, done, tasks, rows)
    path = folder / CHECKPOINT
    checkpoint = _read_record(
        path, lambda: torch.load(path, map_location="cpu", weights_only=True)
    )
    changed = _changed_settings(checkpoint, config)
    if changed:
        warnings.warn(
            f"the run in {folder} had already finished with other settings "
            f"({', '.join(changed)}); nothing was trained with the new ones (restart "
            "to train with them)",
            stacklevel=3,
        )
    with _checkpoint_of_this_model(path):
        model.load_state_dict(checkpoint["model"])
    logger.info("%s: training already finished; loaded its weights", folder)
    return FitResult.from_json(done)


def _read_record(path: Path, read: Callable[[], object]) -> dict:
    """A checkpoint or run record, or an error that says how to get past a
    damaged one."""
    try:
        record = read()
    except FileNotFoundError:
        raise
    except Exception as error:
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise FxfuseError(
            f"{path} is damaged ({first[:160]}); start again with --restart "
            "(restart=True)"
        ) from None
    if not isinstance(record, dict):
        raise FxfuseError(
            f"{path} is damaged (not a record); start again with --restart "
            "(restart=True)"
        )
    return record


def _rows(train: Split, val: Split) -> dict[str, int]:
    """The sizes of the splits, recorded so that a resumed run can tell whether it
    is given the same data."""
    return {"train": len(train), "val": len(val)}


def _check_same_run(
    path: Path, recorded: dict, tasks: dict[str, str], rows: dict[str, int]
) -> None:
    """Refuse to resume (or reuse) a run of other tasks or other data."""
    if recorded.get("tasks") != tasks:
        raise FxfuseError(
            f"{path} records a run of tasks {recorded.get('tasks')}, not {tasks}; "
            "give the same tasks, or start again with --restart (restart=True)"
        )
    before = recorded.get("rows")
    if before is not None and before != rows:
        raise FxfuseError(
            f"{path} records a run on {before['train']} training and {before['val']} "
            f"validation rows, but this run has {rows['train']} and {rows['val']}; "
            "give the same data (and --subset), or start again with --restart "
            "(restart=True)"
        )


@contextlib.contextmanager
def _checkpoint_of_this_model(path: Path) -> Iterator[None]:
    """Turn a state that does not fit the model into an error that says what to do."""
    try:
        yield
    except (RuntimeError, ValueError) as error:
        first = str(error).splitlines()[0]
        raise FxfuseError(
            f"{path} was written for another model or other trainable parameters "
            f"({first}); resume with the same model and unfreeze setting, or start "
            "again with --restart (restart=True)"
        ) from None


def _copy_state(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _write_json(path: Path, data: dict) -> None:
    write_text(path, json.dumps(data, indent=2))


def _write_lines(path: Path, lines: list[dict]) -> None:
    text = "".join(json.dumps(line) + "\n" for line in lines)
    write_text(path, text)


def _append_line(path: Path, line: dict) -> None:
    with path.open("a") as file:
        file.write(json.dumps(line) + "\n")


@contextlib.contextmanager
def _interrupts_deferred() -> Iterator[None]:
    """Hold back Ctrl-C until the block is done, then raise it."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received = []
    previous = signal.signal(signal.SIGINT, lambda *args: received.append(args))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if received:
        raise KeyboardInterrupt


# Distributed training


@dataclass
class _Ranks:
    """This process's place among the ranks of a ``torchrun`` launch."""

    rank: int = 0
    world: int = 1
    created: bool = False

    @classmethod
    def join(cls) -> _Ranks:
        """Join the process group the launcher describes, if there is one."""
        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size())
        if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            return cls()
        if not dist.is_available():
            raise FxfuseError(
                "WORLD_SIZE > 1 but this torch build has no torch.distributed; "
                "run without torchrun"
            )
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        return cls(dist.get_rank(), dist.get_world_size(), created=True)

    def place(self, model: nn.Module) -> torch.device:
        """Move the model to this rank's GPU under NCCL; return its device."""
        if self.world > 1 and torch.cuda.is_available():
            local = int(os.environ.get("LOCAL_RANK", "0"))
            torch.cuda.set_device(local)
            model.to(torch.device("cuda", local))
        return _device_of(model)

    def wrap(
        self, model: nn.Module, model_tasks: list[str] | None, trained: Mapping
    ) -> nn.Module:
        if self.world == 1:
            return model
        # Training some of a fused model's tasks leaves the other tasks' writers and
        # mixers without a gradient, which DDP must be told about.
        unused = model_tasks is not None and bool(set(model_tasks) - set(trained))
        device = _device_of(model)
        return nn.parallel.DistributedDataParallel(
            model,
            device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=unused,
        )

    def share(self, value):
        """Rank 0's `value`, on every rank."""
        if self.world == 1:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def mean(self, total: float, count: int, device: torch.device) -> float:
        """Mean of per-step values summed to `total` over `count` steps per rank."""
        if self.world == 1:
            return total / max(count, 1)
        summed = torch.tensor([total], dtype=torch.float64, device=device)
        dist.all_reduce(summed)
        return summed.item() / max(count * self.world, 1)

    def clear(self, folder: Path) -> None:
        """Rank 0 empties `folder`; every rank waits until it has."""
        if self.rank == 0:
            shutil.rmtree(folder, ignore_errors=True)
        if self.world > 1:
            dist.barrier()

    def leave(self) -> None:
        if self.created:
            dist.destroy_process_group()


# Helpers


def _check_tasks(tasks: Mapping[str, str], splits: Mapping[str, Split]) -> None:
    if not tasks:
        raise InputError("no task to train or score; give at least one")
    for task, kind in tasks.items():
        if kind not in KINDS:
            raise InputError(f"task '{task}' has kind '{kind}'; use one of {KINDS}")
        for name, split in splits.items():
            if task not in split.labels:
                where = f"the {name} split" if name else "the split"
                raise InputError(
                    f"{where} has no labels for task '{task}' (it has "
                    f"{sorted(split.labels)}); train only tasks the data labels"
                )


def _kinds_of(
    model: nn.Module, tasks: Mapping[str, str] | Sequence[str], split: Split
) -> dict[str, str]:
    """Task name to kind: as given, or inferred (`infer_kinds`) from task names."""
    if isinstance(tasks, Mapping):
        return dict(tasks)
    if isinstance(tasks, str):
        tasks = [tasks]
    return infer_kinds(model, list(tasks), split)


def _output_kinds(
    model: nn.Module, tasks: Mapping[str, str], given: Mapping[str, str] | None
) -> dict[str, str]:
    info = getattr(model, "fusion_info", None)
    kinds = {}
    for task in tasks:
        if given is not None and task in given:
            kinds[task] = given[task]
        elif info is not None and task in info.tasks:
            kinds[task] = info.output_kind(task)
        else:
            kinds[task] = "logits"
        if kinds[task] not in OUTPUT_KINDS:
            raise InputError(
                f"output kind '{kinds[task]}' of task '{task}' is unknown; use one "
                f"of {OUTPUT_KINDS}"
            )
    return kinds


def _task_weights(config: TrainConfig, tasks: Mapping[str, str]) -> dict[str, float]:
    given = dict(config.task_weights or {})
    unknown = set(given) - set(tasks)
    if unknown:
        raise InputError(
            f"task_weights names {sorted(unknown)}, which are not trained tasks "
            f"({sorted(tasks)})"
        )
    return {task: float(given.get(task, 1.0)) for task in tasks}


def _fused_tasks(model: nn.Module) -> list[str] | None:
    info = getattr(model, "fusion_info", None)
    return list(info.tasks) if info is not None else None


def _outputs(predictions) -> Mapping[str, Tensor]:
    if not isinstance(predictions, Mapping):
        raise InputError(
            f"the model returns a {type(predictions).__name__}, but training needs "
            "{task: prediction}; fuse the models, or wrap the model so that it "
            "returns a dict"
        )
    return predictions


def _device_of(model: nn.Module) -> torch.device:
    for tensor in model.parameters():
        return tensor.device
    return torch.device("cpu")


def _to_device(split: Split, device: torch.device) -> Split:
    if device.type == "cpu":
        return split
    if isinstance(split.inputs, dict):
        inputs = {k: v.to(device, non_blocking=True) for k, v in split.inputs.items()}
    else:
        inputs = split.inputs.to(device, non_blocking=True)
    labels = {k: v.to(device, non_blocking=True) for k, v in split.labels.items()}
    return Split(inputs, labels)


def _rounded(metrics: Mapping[str, float]) -> dict[str, float]:
    return {task: round(value, 6) for task, value in metrics.items()}

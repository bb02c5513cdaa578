"""Training: metrics, losses by output kind, fit, early stopping, resume, DDP."""

from __future__ import annotations

import copy
import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fxfuse import fuse, save
from fxfuse.data._split import Split
from fxfuse.errors import FxfuseError, InputError
from fxfuse.metrics import higher_is_better, mean_score, metric_name, task_metric
from fxfuse.train import (
    TrainConfig,
    _interrupts_deferred,
    evaluate,
    fit,
    loss_for,
    predict,
)

ROOT = Path(__file__).resolve().parents[1]


# Models and data


class SmallNet(nn.Module):
    """An MLP over ``[B, 4]`` inputs with one ``[B]`` logit head per task."""

    def __init__(self, tasks=("y",), dropout: float = 0.0):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Dropout(dropout))
        self.heads = nn.ModuleDict({task: nn.Linear(16, 1) for task in tasks})

    def forward(self, x):
        hidden = self.body(x)
        return {task: head(hidden).squeeze(-1) for task, head in self.heads.items()}


class Slope(nn.Module):
    """``y = w * x`` with ``w`` starting at 0."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(()))

    def forward(self, x):
        return {"y": self.w * x}


def linear_problem(rows: int, seed: int = 0) -> tuple[Split, Split]:
    """Binary task 'y': the sign of a fixed linear function of 4 features."""
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(rows, 4, generator=generator)
    labels = (inputs @ torch.tensor([1.0, -2.0, 0.5, 0.0]) > 0).float()
    split = Split(inputs, {"y": labels})
    cut = rows * 3 // 4
    return split.take(slice(0, cut)), split.take(slice(cut, None))


def trained_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_same_state(first: dict, second: dict, atol: float = 0.0) -> None:
    assert first.keys() == second.keys()
    for key in first:
        assert torch.allclose(first[key].float(), second[key].float(), atol=atol), key


QUIET = {"progress": False}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models train much faster on one thread than on contended cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def fused_problem():
    """A fused model with BatchNorm in its members, and data for its two tasks.

    Task 'a' has two models ending in logits; task 'b' one model ending in a
    sigmoid, so its predictions are probabilities.
    """
    torch.manual_seed(0)

    def member(sigmoid: bool = False) -> nn.Module:
        layers = [
            nn.Linear(6, 16),
            nn.BatchNorm1d(16),
            nn.ReLU(),
            nn.Linear(16, 16),
            nn.ReLU(),
            nn.Linear(16, 1),
        ]
        model = nn.Sequential(*layers, *([nn.Sigmoid()] if sigmoid else []))
        with torch.no_grad():  # trained statistics, not the defaults
            model[1].running_mean.normal_()
            model[1].running_var.uniform_(0.5, 2.0)
        return model.eval()

    inputs = torch.randn(640, 6)
    labels = {
        "a": (inputs[:, 0] + inputs[:, 1] * inputs[:, 2] > 0).float(),
        "b": (inputs[:, 3] * inputs[:, 4] > 0).float(),
    }
    fused = fuse(
        {"a": [member(), member()], "b": [member(sigmoid=True)]},
        (inputs[:4],),
        levels=2,
        width=8,
        heads=2,
    )
    rows = Split(inputs, labels)
    return fused, rows.take(slice(0, 512)), rows.take(slice(512, None))


def clone(fused):
    """A deep copy that keeps `fusion_info` (GraphModule's deepcopy drops it)."""
    copied = copy.deepcopy(fused)
    copied.fusion_info = fused.fusion_info
    return copied


TASKS = {"a": "binary", "b": "binary"}


# Metrics


def test_auc_of_a_hand_made_example_is_three_quarters():
    scores = torch.tensor([0.1, 0.4, 0.35, 0.8])
    labels = torch.tensor([0.0, 0.0, 1.0, 1.0])
    # Pairs (positive, negative) ranked right: (0.35, 0.1), (0.8, 0.1), (0.8, 0.4).
    assert task_metric("binary", scores, labels, "probability") == 0.75
    logits = torch.logit(scores).unsqueeze(1)
    assert task_metric("binary", logits, labels, "logits") == 0.75


def test_accuracy_counts_rows_whose_top_class_is_the_label():
    scores = torch.tensor(
        [[2.0, 1.0, 0.0], [0.0, 3.0, 1.0], [1.0, 0.0, 5.0], [4, 5, 6]]
    )
    labels = torch.tensor([0, 1, 2, 0])
    assert task_metric("multiclass", scores, labels) == 0.75


def test_rmse_of_predictions_in_either_shape():
    labels = torch.tensor([1.0, 0.0, 3.0])
    expected = math.sqrt(4 / 3)
    assert task_metric("regression", torch.tensor([1.0, 2.0, 3.0]), labels) == (
        pytest.approx(expected)
    )
    column = torch.tensor([[1.0], [2.0], [3.0]])
    assert task_metric("regression", column, labels) == pytest.approx(expected)


def test_mean_score_negates_rmse_so_that_higher_is_better():
    kinds = {"click": "binary", "price": "regression", "kind": "multiclass"}
    metrics = {"click": 0.8, "price": 0.5, "kind": 0.6}
    assert mean_score(metrics, kinds) == pytest.approx((0.8 - 0.5 + 0.6) / 3)
    assert [metric_name(k) for k in kinds.values()] == ["auc", "rmse", "accuracy"]
    assert [higher_is_better(k) for k in kinds.values()] == [True, False, True]


def test_auc_of_labels_with_one_class_is_an_input_error():
    with pytest.raises(InputError, match="only|all 3 labels"):
        task_metric("binary", torch.rand(3), torch.ones(3))


def test_a_prediction_of_the_wrong_shape_is_an_input_error():
    with pytest.raises(InputError, match=r"\[N\] or \[N, 1\]"):
        task_metric("regression", torch.zeros(3, 2), torch.zeros(3))


# Losses


def test_binary_loss_is_bce_on_probabilities_or_on_logits_by_output_kind():
    prediction, label = torch.tensor([[0.8]]), torch.tensor([1.0])
    on_probability = loss_for("binary", "probability")(prediction, label)
    on_logits = loss_for("binary", "logits")(prediction, label)
    assert on_probability.item() == pytest.approx(-math.log(0.8))
    assert on_logits.item() == pytest.approx(math.log(1 + math.exp(-0.8)))


def test_probabilities_of_zero_and_one_give_a_finite_loss():
    loss = loss_for("binary", "probability")(torch.tensor([0.0, 1.0]), torch.ones(2))
    assert math.isfinite(loss.item())
    assert loss.item() == pytest.approx(-math.log(1e-7) / 2, rel=1e-3)


def test_multiclass_loss_is_nll_of_probabilities_or_cross_entropy_of_logits():
    scores, label = torch.tensor([[0.7, 0.2, 0.1]]), torch.tensor([0])
    on_probability = loss_for("multiclass", "probability")(scores, label)
    on_logits = loss_for("multiclass", "logits")(scores, label)
    assert on_probability.item() == pytest.approx(-math.log(0.7))
    assert on_logits.item() == pytest.approx(-torch.log_softmax(scores, 1)[0, 0].item())


def test_regression_loss_is_the_mean_squared_error():
    loss = loss_for("regression", "logits")(torch.tensor([1.0, 2.0]), torch.zeros(2))
    assert loss.item() == pytest.approx(2.5)


# Fit


def test_fit_picks_bce_on_probabilities_for_a_task_that_ends_in_a_sigmoid(
    fused_problem,
):
    fused, train, val = fused_problem
    model = clone(fused)
    assert model.fusion_info.output_kind("b") == "probability"
    predictions = predict(model, train)
    a, b = predictions["a"].squeeze(1), predictions["b"].squeeze(1)
    expected = F.binary_cross_entropy_with_logits(
        a, train.labels["a"]
    ) + F.binary_cross_entropy(b, train.labels["b"])
    wrong = F.binary_cross_entropy_with_logits(
        a, train.labels["a"]
    ) + F.binary_cross_entropy_with_logits(b, train.labels["b"])

    # With lr 0 and one batch, the epoch's loss is the loss of the model as given.
    config = TrainConfig(epochs=1, batch_size=len(train), lr=0.0, **QUIET)
    result = fit(model, train, val, TASKS, config)

    assert result.history[0]["train_loss"] == pytest.approx(expected.item(), abs=1e-5)
    assert abs(expected - wrong).item() > 0.01  # the wrong choice is detectable


def test_fit_trains_fusion_modules_and_leaves_frozen_stages_and_their_statistics(
    fused_problem,
):
    fused, train, val = fused_problem
    model = clone(fused)
    before = trained_state(model)
    members = tuple(f"{m.name}." for m in model.fusion_info.models)

    config = TrainConfig(epochs=2, batch_size=64, max_steps=3, lr=1e-2, **QUIET)
    fit(model, train, val, TASKS, config, output_kinds={"b": "probability"})

    after = model.state_dict()
    frozen = [key for key in before if key.startswith(members)]
    assert any("running_var" in key for key in frozen)
    for key in frozen:
        assert torch.equal(before[key], after[key]), key
    assert not torch.equal(
        before["fusion1.writers.0.weight"], after["fusion1.writers.0.weight"]
    )
    assert after["fusion2.writers.2.weight"].abs().sum() > 0


def test_fit_trains_only_the_tasks_it_is_given(fused_problem):
    fused, train, val = fused_problem
    model = clone(fused)
    mixer_before = model.mix_a.logits.clone()

    config = TrainConfig(epochs=1, batch_size=64, max_steps=2, lr=1e-2, **QUIET)
    result = fit(model, train, val, {"b": "binary"}, config)

    assert torch.equal(model.mix_a.logits, mixer_before)
    assert list(result.history[0]["val"]) == ["b"]


def test_loss_falls_and_validation_auc_rises_on_a_learnable_problem(tmp_path):
    train, val = linear_problem(1024)
    torch.manual_seed(0)
    model = SmallNet()
    metrics = tmp_path / "metrics.jsonl"

    config = TrainConfig(epochs=4, batch_size=64, lr=1e-2, **QUIET)
    result = fit(model, train, val, {"y": "binary"}, config, metrics_path=metrics)

    losses = [line["train_loss"] for line in result.history]
    assert losses == sorted(losses, reverse=True) and losses[-1] < 0.5 * losses[0]
    assert result.best_metrics["y"] > 0.97 > result.initial_metrics["y"]
    assert evaluate(model, val, {"y": "binary"}) == result.best_metrics
    lines = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert lines == result.history
    assert set(lines[0]) == {"epoch", "train_loss", "val", "val_score", "lr", "seconds"}


def test_the_cosine_schedule_lowers_the_learning_rate_step_by_step():
    train, val = linear_problem(256)
    config = TrainConfig(
        epochs=2, batch_size=48, lr=0.1, schedule="cosine", patience=5, **QUIET
    )  # 4 steps per epoch, 8 in all; the last step is step 7
    result = fit(SmallNet(), train, val, {"y": "binary"}, config)
    assert result.history[0]["lr"] == pytest.approx(
        0.05 * (1 + math.cos(math.pi * 3 / 8))
    )
    assert result.history[1]["lr"] == pytest.approx(
        0.05 * (1 + math.cos(math.pi * 7 / 8))
    )


def test_two_runs_with_the_same_seed_end_with_the_same_weights():
    train, val = linear_problem(512)
    torch.manual_seed(1)
    initial = SmallNet(dropout=0.3)
    config = TrainConfig(epochs=2, batch_size=64, lr=1e-2, seed=7, **QUIET)

    runs = []
    for seed in (7, 7, 8):
        model = copy.deepcopy(initial)
        config.seed = seed
        fit(model, train, val, {"y": "binary"}, config)
        runs.append(trained_state(model))

    assert_same_state(runs[0], runs[1])
    assert not torch.equal(runs[0]["body.0.weight"], runs[2]["body.0.weight"])


def test_early_stopping_stops_when_validation_worsens_and_restores_the_best_epoch():
    # Training pulls w towards 2, validation wants 1: the score peaks and falls.
    x = torch.linspace(-1, 1, 64)
    train, val = Split(x, {"y": 2 * x}), Split(x, {"y": x})
    config = TrainConfig(
        epochs=20, batch_size=64, lr=0.3, weight_decay=0.0, patience=2, **QUIET
    )

    model = Slope()
    result = fit(model, train, val, {"y": "regression"}, config)

    rmse = [line["val"]["y"] for line in result.history]
    assert result.stopped_early
    assert 1 <= result.best_epoch == len(rmse) - 2
    assert rmse[result.best_epoch - 1] == min(rmse) == result.best_metrics["y"]
    assert result.best_score == -min(rmse)

    # The weights are those after best_epoch epochs, not after the last one.
    replay = Slope()
    config.epochs = result.best_epoch
    fit(replay, train, val, {"y": "regression"}, config)
    assert model.w.item() == replay.w.item()
    assert abs(model.w.item() - 1) < 0.3


def test_fit_keeps_the_given_weights_when_no_epoch_improves_on_them():
    x = torch.linspace(-1, 1, 64)
    train, val = Split(x, {"y": 2 * x}), Split(x, {"y": 0 * x})
    config = TrainConfig(
        epochs=5, batch_size=64, lr=0.3, weight_decay=0.0, patience=2, **QUIET
    )
    model = Slope()
    result = fit(model, train, val, {"y": "regression"}, config)
    assert result.best_epoch == 0 and result.stopped_early
    assert model.w.item() == 0.0


# Checkpoints and resume


class Interrupt:
    """A forward pre-hook that raises KeyboardInterrupt at a given training step."""

    def __init__(self, at_step: int | None):
        self.at_step = at_step
        self.calls = 0

    def __call__(self, module, args):
        if module.training:
            self.calls += 1
            if self.calls == self.at_step:
                raise KeyboardInterrupt


def test_a_run_interrupted_mid_epoch_resumes_to_the_weights_of_an_unbroken_run(
    tmp_path,
):
    train, val = linear_problem(512)
    torch.manual_seed(2)
    initial = SmallNet(dropout=0.3)  # dropout: the RNG must be restored too
    config = TrainConfig(
        epochs=3, batch_size=64, lr=1e-2, patience=5, checkpoint_every=5, **QUIET
    )  # 6 steps per epoch, 18 in all
    tasks = {"y": "binary"}

    unbroken = copy.deepcopy(initial)
    expected = fit(unbroken, train, val, tasks, config)

    folder, metrics = tmp_path / "run", tmp_path / "metrics.jsonl"
    broken = copy.deepcopy(initial)
    broken.register_forward_pre_hook(Interrupt(at_step=9))
    with pytest.raises(KeyboardInterrupt):
        fit(
            broken,
            train,
            val,
            tasks,
            config,
            checkpoint_dir=folder,
            metrics_path=metrics,
        )
    saved = torch.load(folder / "last.pt", weights_only=True)
    assert (saved["run"]["epoch"], saved["run"]["step"]) == (2, 2)
    assert len(metrics.read_text().splitlines()) == 1

    resumed = copy.deepcopy(initial)  # a fresh process starts from the given model
    counter = Interrupt(at_step=None)
    resumed.register_forward_pre_hook(counter)
    result = fit(
        resumed, train, val, tasks, config, checkpoint_dir=folder, metrics_path=metrics
    )

    assert counter.calls == 18 - 8
    assert_same_state(trained_state(resumed), trained_state(unbroken), atol=1e-6)
    assert [line["train_loss"] for line in result.history] == pytest.approx(
        [line["train_loss"] for line in expected.history], abs=1e-6
    )
    assert len(metrics.read_text().splitlines()) == 3
    assert (folder / "done.json").is_file()

    # A finished run loads its weights and returns its result without training.
    again = copy.deepcopy(initial)
    counter = Interrupt(at_step=None)
    again.register_forward_pre_hook(counter)
    repeated = fit(again, train, val, tasks, config, checkpoint_dir=folder)
    assert counter.calls == 0
    assert repeated.history == result.history
    assert_same_state(trained_state(again), trained_state(resumed))


def test_ctrl_c_during_a_weight_update_is_raised_after_the_update():
    steps = []
    with pytest.raises(KeyboardInterrupt):
        with _interrupts_deferred():
            os.kill(os.getpid(), signal.SIGINT)
            steps.append("updated")
    assert steps == ["updated"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_the_checkpoint_holds_only_tensors_and_plain_values(tmp_path):
    train, val = linear_problem(256)
    config = TrainConfig(epochs=1, batch_size=64, **QUIET)
    fit(SmallNet(), train, val, {"y": "binary"}, config, checkpoint_dir=tmp_path)
    checkpoint = torch.load(tmp_path / "last.pt", weights_only=True)
    assert {"model", "optimizer", "run", "best_state", "rng"} <= set(checkpoint)
    assert checkpoint["run"]["epoch"] == 2 and checkpoint["run"]["global_step"] == 3
    assert not list(tmp_path.glob(".*.tmp"))


def test_resuming_another_models_checkpoint_is_an_error_that_says_what_to_do(
    tmp_path,
):
    train, val = linear_problem(256)
    config = TrainConfig(epochs=1, batch_size=64, **QUIET)
    fit(SmallNet(), train, val, {"y": "binary"}, config, checkpoint_dir=tmp_path)
    (tmp_path / "done.json").unlink()  # as if interrupted before the end
    with pytest.raises(FxfuseError, match="another model.*start again"):
        other = SmallNet(tasks=("y", "z"))  # one more head: other parameters
        fit(other, train, val, {"y": "binary"}, config, checkpoint_dir=tmp_path)


# Distributed


@pytest.mark.slow
def test_two_ddp_ranks_end_with_the_same_weights_as_one_process(tmp_path):
    from tests._ddp_worker import CONFIG, TASKS, tiny_data, tiny_model

    fused = tiny_model()
    save(fused, tmp_path / "fused")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        str(ROOT / "tests" / "_ddp_worker.py"),
        str(tmp_path),
    ]
    launched = subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )

    # Meanwhile, the same training in this one process.
    train, val = tiny_data()
    single = fit(fused, train, val, TASKS, CONFIG)

    output, _ = launched.communicate(timeout=120)
    assert launched.returncode == 0, output[-3000:]
    rank0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    rank1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert_same_state(rank0, rank1)
    # Each rank takes half of every batch, so a step's gradient is the whole batch's.
    assert_same_state(rank0, trained_state(fused), atol=1e-5)
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == CONFIG.epochs == len(single.history)
    assert (tmp_path / "checkpoint" / "done.json").is_file()

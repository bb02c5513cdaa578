"""Start each task's head mixing from how well its models do on validation rows.

A uniform average sits below its best model when one model is much weaker than the
others. Before training, `weigh_heads` runs every model alone on validation rows and
sets each task's mixing weights in one of two ways:

- ``"fit"`` (the default): the weights that minimise the task's loss of the mixed
  prediction on those rows, found by L-BFGS over the mixer's few logits. Models
  that add something to the best one keep a share; a model that only hurts gets
  almost none.
- ``"scores"``: ``softmax(score / temperature)`` of each model's metric alone, so
  models within a few hundredths of each other keep nearly equal weights.

Training keeps the validation-best weights and the starting point counts as epoch
0, so the fused model never scores below its starting mixture on validation rows.
"""

from __future__ import annotations

import math

import torch
import torch.fx as fx
from torch import Tensor

from .data import Split
from .generate import members_alone
from .metrics import higher_is_better
from .train import evaluate, loss_for, predict

TEMPERATURE = 0.01
METHODS = ("fit", "scores")
# Smallest weight a model keeps, so that training can still raise it.
FLOOR = 1e-6


def weigh_heads(
    fused: fx.GraphModule,
    split: Split,
    tasks: dict[str, str],
    method: str = "fit",
    temperature: float = TEMPERATURE,
) -> dict[str, dict[str, float]]:
    """Set each task's mixing weights from its models' predictions on `split`.

    Args:
        fused: a fused model.
        split: validation rows.
        tasks: task name to kind ("binary", "multiclass", "regression").
        method: "fit" (weights minimising the mixed loss) or "scores" (softmax of
            each model's metric alone).
        temperature: for "scores": the score difference that changes a weight by
            a factor of e.

    Returns:
        For each task with a mixer, the weight given to each of its models.
    """
    if method not in METHODS:
        raise ValueError(f"head weighing method '{method}' is unknown; use {METHODS}")
    info = fused.fusion_info
    alone = members_alone(fused)
    chosen: dict[str, dict[str, float]] = {}
    for task in info.tasks:
        names = [m.name for m in info.task_models(task)]
        if len(names) < 2 or task not in tasks:
            continue
        kinds = {task: info.output_kind(task)}
        if method == "fit":
            predictions = [predict(alone[n], split)[task] for n in names]
            loss = loss_for(tasks[task], kinds[task])
            weights = _fitted_weights(predictions, split.labels[task], loss)
        else:
            scores = []
            for name in names:
                metric = evaluate(alone[name], split, {task: tasks[task]}, kinds)[task]
                scores.append(metric if higher_is_better(tasks[task]) else -metric)
            best = max(scores)
            raw = [math.exp((s - best) / temperature) for s in scores]
            weights = [w / sum(raw) for w in raw]
        weights = [max(w, FLOOR) for w in weights]
        fused.get_submodule(f"mix_{task}").set_weights(weights)
        info.head_weights[task] = weights
        chosen[task] = dict(zip(names, weights, strict=True))
    return chosen


def _fitted_weights(predictions: list[Tensor], labels: Tensor, loss) -> list[float]:
    """Softmax weights minimising ``loss(Σ w_i p_i, labels)``, from uniform."""
    stacked = torch.stack(predictions, dim=-1).detach().float()
    logits = torch.zeros(len(predictions), requires_grad=True)
    optimizer = torch.optim.LBFGS([logits], max_iter=100, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        optimizer.zero_grad()
        value = loss((stacked * logits.softmax(0)).sum(-1), labels)
        value.backward()
        return value

    optimizer.step(closure)
    return logits.detach().softmax(0).tolist()

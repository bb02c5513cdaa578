"""Start each task's head mixing from its models' validation scores.

A uniform average sits below its best model when one model is much weaker than the
others. Before training, `weigh_heads` scores every model alone on validation rows
and sets the mixing weights to ``softmax(score / temperature)``: models within a few
hundredths of each other keep nearly equal weights, a clearly weaker model gets
almost none. Because training keeps the validation-best weights, and the starting
point counts as epoch 0, the fused model then never scores below its best model on
the validation rows.
"""

from __future__ import annotations

import math

import torch.fx as fx

from .data import Split
from .generate import members_alone
from .metrics import higher_is_better
from .train import evaluate

TEMPERATURE = 0.01


def weigh_heads(
    fused: fx.GraphModule,
    split: Split,
    tasks: dict[str, str],
    temperature: float = TEMPERATURE,
) -> dict[str, dict[str, float]]:
    """Score each model alone and set its task's mixing weights from the scores.

    Args:
        fused: a fused model.
        split: validation rows.
        tasks: task name to kind ("binary", "multiclass", "regression").
        temperature: score difference that changes a weight by a factor of e.

    Returns:
        For each task with a mixer, the weight given to each of its models.
    """
    info = fused.fusion_info
    scores: dict[str, float] = {}
    for name, member in members_alone(fused).items():
        task = member.task
        if task not in tasks:
            continue
        kinds = {task: info.output_kind(task)}
        metric = evaluate(member, split, {task: tasks[task]}, kinds)[task]
        scores[name] = metric if higher_is_better(tasks[task]) else -metric

    chosen: dict[str, dict[str, float]] = {}
    for task in info.tasks:
        names = [m.name for m in info.task_models(task)]
        if len(names) < 2 or task not in tasks:
            continue
        best = max(scores[n] for n in names)
        raw = [math.exp((scores[n] - best) / temperature) for n in names]
        weights = [max(w / sum(raw), 1e-6) for w in raw]
        fused.get_submodule(f"mix_{task}").set_weights(weights)
        info.head_weights[task] = weights
        chosen[task] = dict(zip(names, weights, strict=True))
    return chosen

"""Choose where to cut each model: `L` cut points per model.

Cuts are taken among the coarsest ranks that offer enough of them (whole top-level
blocks first), and placed so that the stages between them have FLOPs as equal as
possible (dynamic programming over the candidates). A user can name the cuts by
module path or node name instead.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

from .analyse import Analysis, CutPoint
from .errors import PlanError

# The balancing search is quadratic in the candidates; graphs with more cut points
# than this are searched over this many, spread evenly over the FLOPs.
MAX_CANDIDATES = 256

# A plan is balanced enough when no stage holds more than this many times its fair
# share of the model's FLOPs (1 / (levels + 1)).
BALANCE_LIMIT = 2.0


def candidate_pools(analysis: Analysis, levels: int) -> list[list[CutPoint]]:
    """Cut points of rank <= r for each rank r that offers at least `levels` of
    them, coarsest first, then every cut point."""
    ranks = sorted({c.rank for c in analysis.cut_points if c.rank is not None})
    pools = []
    for rank in ranks:
        pool = [c for c in analysis.cut_points if c.rank is not None and c.rank <= rank]
        if len(pool) >= levels:
            pools.append(pool)
    pools.append(list(analysis.cut_points))
    return pools


def stage_fractions(cuts: Sequence[CutPoint], total: int) -> list[float]:
    """Each stage's share of the model's FLOPs."""
    bounds = [0] + [c.flops for c in cuts] + [total]
    return [(b - a) / total if total else 0.0 for a, b in itertools.pairwise(bounds)]


def plan_cuts(
    analysis: Analysis,
    levels: int = 3,
    cuts: Sequence[str] | None = None,
    name: str = "model",
) -> list[CutPoint]:
    """The cut points to split a model at, in order.

    Args:
        analysis: the model's analysis.
        levels: how many cuts (the model then has `levels + 1` stages).
        cuts: module paths or node names to cut at, instead of choosing.
        name: the model's name, for error messages.

    Raises:
        PlanError: the model has too few cut points, or a named cut is not one.
    """
    if cuts:
        return _named_cuts(analysis, cuts, name)
    available = len(analysis.cut_points)
    if levels < 1:
        raise PlanError(f"levels must be at least 1, got {levels}")
    if available < levels:
        raise PlanError(
            f"{name} has {available} cut point{'s' * (available != 1)}, fewer than "
            f"the {levels} levels asked for; use --levels {available} or fewer",
            limitation="few-cut-points",
        )
    # The coarsest ranks whose best plan is balanced enough; else the best balance.
    total = analysis.total_flops
    limit = BALANCE_LIMIT / (levels + 1)
    plans = [
        _balanced(pool, levels, total) for pool in candidate_pools(analysis, levels)
    ]
    for plan in plans:
        if max(stage_fractions(plan, total)) <= limit:
            return plan
    return min(plans, key=lambda plan: _imbalance(plan, total))


def _imbalance(cuts: Sequence[CutPoint], total: int) -> tuple[float, float]:
    """Largest stage share first, then the sum of squared shares."""
    fractions = stage_fractions(cuts, total)
    return max(fractions), sum(f * f for f in fractions)


def _named_cuts(analysis: Analysis, cuts: Sequence[str], name: str) -> list[CutPoint]:
    chosen = []
    for wanted in cuts:
        try:
            chosen.append(analysis.find(wanted))
        except KeyError:
            known = [c.closes or c.node for c in analysis.cut_points]
            shown = ", ".join(known[:12]) + (" ..." if len(known) > 12 else "")
            raise PlanError(
                f"'{wanted}' is not a cut point of {name}; its cut points are: {shown} "
                "(run `fxfuse inspect` to see them all)"
            ) from None
    indices = [c.index for c in chosen]
    if indices != sorted(set(indices)):
        raise PlanError(
            f"cuts of {name} must be distinct and in order from input to output; "
            f"got {list(cuts)}"
        )
    return chosen


def _thinned(pool: list[CutPoint], total: int) -> list[CutPoint]:
    """At most `MAX_CANDIDATES` cut points, the nearest to evenly spaced FLOPs."""
    if len(pool) <= MAX_CANDIDATES:
        return pool
    kept: dict[int, CutPoint] = {}
    j = 0
    for k in range(MAX_CANDIDATES):
        target = total * (k + 0.5) / MAX_CANDIDATES
        while j + 1 < len(pool) and pool[j + 1].flops <= target:
            j += 1
        kept[pool[j].index] = pool[j]
    return sorted(kept.values(), key=lambda c: c.index)


def _balanced(pool: list[CutPoint], levels: int, total: int) -> list[CutPoint]:
    """`levels` cuts from `pool` that make the stages' FLOPs as equal as possible.

    Minimises the sum of squared stage FLOPs: best[k][j] is the cost of the first
    k stages when the k-th cut is pool[j].
    """
    pool = _thinned(pool, total)
    flops = [c.flops for c in pool]
    n = len(pool)
    inf = float("inf")
    best = [[inf] * n for _ in range(levels + 1)]
    back = [[-1] * n for _ in range(levels + 1)]
    for j in range(n):
        best[1][j] = float(flops[j]) ** 2
    for k in range(2, levels + 1):
        for j in range(k - 1, n):
            for i in range(k - 2, j):
                cost = best[k - 1][i] + float(flops[j] - flops[i]) ** 2
                if cost < best[k][j]:
                    best[k][j], back[k][j] = cost, i
    last = min(
        range(levels - 1, n),
        key=lambda j: (best[levels][j] + float(total - flops[j]) ** 2, -j),
    )
    chosen = [last]
    for k in range(levels, 1, -1):
        chosen.append(back[k][chosen[-1]])
    return [pool[j] for j in reversed(chosen)]

"""How each model of a fused model reads the fused inputs.

The fused model takes the union of its models' inputs: one shared tensor, or dicts
of named features. A model that names a feature differently reads it through an
input map (``{its key: fused key}``, applied by `rename_keys`); a model from a
``.pt2`` archive, which refuses dict keys it was not exported with, gets only its
own keys (`select_keys`). Both functions appear as one line each in the fused
model's code::

    income_years_x = fxfuse_inputs_rename_keys(x, {'years': 'age'})
    income_shop_x = fxfuse_inputs_select_keys(x, ['age', 'shop'])
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch.fx as fx
import torch.utils._pytree as pytree
from torch import nn

from .errors import FuseError, InputError
from .load import LoadedModel


def input_keys(example_inputs: tuple) -> list[list[str] | None]:
    return [
        [str(k) for k in value] if isinstance(value, dict) else None
        for value in example_inputs
    ]


def checked_input_map(
    input_map: Mapping[str, Mapping[str, str]],
    names: list[str],
    input_keys: list[list[str] | None],
) -> dict[str, dict[str, str]]:
    """`input_map` as plain dicts, after checking its models and fused keys."""
    unknown = sorted(set(input_map) - set(names))
    if unknown:
        raise FuseError(
            f"the input map (--input-map) names unknown models {unknown}; the models "
            f"are {names}"
        )
    available = [key for keys in input_keys if keys for key in keys]
    checked: dict[str, dict[str, str]] = {}
    for name, renames in input_map.items():
        for own, fused in renames.items():
            if not available:
                raise InputError(
                    f"the input map of {name} reads '{fused}' as '{own}', but the "
                    "fused inputs are not dicts; map keys only for dict inputs"
                )
            if fused not in available:
                raise InputError(
                    f"model {name} expects '{own}' from fused input '{fused}', which "
                    f"the fused inputs do not have (they have: {', '.join(available)});"
                    f" map '{own}' to one of them"
                )
        checked[name] = {str(own): str(fused) for own, fused in renames.items()}
    return checked


def by_position(
    renames: Mapping[str, str], input_keys: Sequence[Sequence[str] | None]
) -> dict[int, dict[str, str]]:
    """`{its key: fused key}` split by the positional dict input holding the fused
    key (the first input when the keys are not known)."""
    positions: dict[int, dict[str, str]] = {}
    for own, fused in renames.items():
        position = next(
            (i for i, keys in enumerate(input_keys) if keys and fused in keys), 0
        )
        positions.setdefault(position, {})[own] = fused
    return positions


def rename_keys(inputs: dict, renames: Mapping[str, str]) -> dict:
    """A new dict: `inputs` with each fused key of `renames` (``{its key: fused
    key}``) replaced, in place in the key order, by the model's own key(s); keys not
    mentioned pass through unchanged, and an own key takes precedence over a fused
    key of the same name.

    The fused graph calls this for a model given an ``input_map``. Under
    ``torch.fx.symbolic_trace`` it records itself as one call instead of running.

    Example::

        >>> rename_keys({"shop": 1, "age": 2}, {"years": "age"})
        {'shop': 1, 'years': 2}
    """
    if isinstance(inputs, fx.Proxy):
        return inputs.tracer.create_proxy(
            "call_function", rename_keys, (inputs, dict(renames)), {}
        )
    renamed = {}
    for key, value in inputs.items():
        owns = [own for own, fused in renames.items() if fused == key]
        if owns:
            renamed.update(dict.fromkeys(owns, value))
        elif key not in renames:
            renamed[key] = value
    return renamed


def select_keys(inputs: dict, keys: Sequence[str]) -> dict:
    """A new dict of the values of `inputs` under `keys` only, in that order.

    The fused graph calls this, after any `rename_keys`, for a model that takes only
    some of the keys of a dict input: a model from a ``.pt2`` archive refuses a dict
    with keys it was not exported with. Models that are Python code read the keys
    they need and get the whole dict. Under ``torch.fx.symbolic_trace`` it records
    itself as one call instead of running.

    Example::

        >>> select_keys({"age": 1, "shop": 2, "price": 3}, ["shop", "age"])
        {'shop': 2, 'age': 1}
    """
    if isinstance(inputs, fx.Proxy):
        return inputs.tracer.create_proxy(
            "call_function", select_keys, (inputs, list(keys)), {}
        )
    return {key: inputs[key] for key in keys}


def as_read(
    inputs: tuple,
    renames: Mapping[int, Mapping[str, str]],
    selections: Mapping[int, Sequence[str]] | None = None,
) -> tuple:
    """`inputs` as a model reads them: each dict input named in `renames` renamed by
    `rename_keys`, then each named in `selections` cut to its keys by `select_keys`."""
    selections = selections or {}
    if not renames and not selections:
        return inputs
    read = list(inputs)
    for i, value in enumerate(read):
        if i in renames:
            value = rename_keys(value, renames[i])
        if i in selections:
            value = select_keys(value, selections[i])
        read[i] = value
    return tuple(read)


def fixed_keys(model: nn.Module) -> dict[int, list[str]]:
    """The keys of each positional dict input that `model` takes exactly.

    A module from a ``.pt2`` archive (``program.module()``) checks its inputs
    against the tree spec it was exported with and refuses a dict with other keys;
    Python modules read what they need, so for them this is empty.
    """
    spec = getattr(model, "_in_spec", None)
    if not isinstance(spec, pytree.TreeSpec):
        return {}
    try:  # the spec is of (args, kwargs)
        args, _ = pytree.tree_unflatten([None] * spec.num_leaves, spec)
    except (TypeError, ValueError):
        return {}
    return {
        i: [str(key) for key in arg]
        for i, arg in enumerate(args)
        if isinstance(arg, dict)
    }


def selections_for(
    loaded: LoadedModel, name: str, inputs: tuple
) -> dict[int, list[str]]:
    """The keys a model takes of each dict input where `inputs` (as it reads them)
    hold more than it takes; empty for a model that takes any dict."""
    selections = {}
    for position, keys in fixed_keys(loaded.model).items():
        value = inputs[position] if position < len(inputs) else None
        if not isinstance(value, dict):
            continue
        missing = [key for key in keys if key not in value]
        if missing:
            raise InputError(
                f"model {name} ({loaded.source}) takes dict input keys "
                f"{', '.join(keys)}, but the fused inputs lack {', '.join(missing)} "
                f"(they have: {', '.join(map(str, value))}); add the missing keys to "
                "the example inputs, or map each to a fused key with --input-map "
                f"{name}:{missing[0]}=FUSED_KEY"
            )
        if set(value) != set(keys):
            selections[position] = keys
    return selections

"""The type and range of every config value, checked before any weights or data are read.

The types come from the objects the config nodes build: the annotations of each `_target_`'s
signature (data modules, optimizer, scheduler, Lightning's Trainer) or dataclass fields
(`LoRAConfig`, `ModelConfig`), read with `typing.get_type_hints`. The ranges are `RANGES`, for the
keys where a value of the right type can still be wrong (`lora.lora_dropout=1.5`). A value is
refused only when its type is known to be wrong: an annotation naming a class that no config value
can be (a Tensor, a Strategy object) accepts what it cannot judge.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import difflib
import inspect
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal, Union

from hydra.utils import get_object
from omegaconf import DictConfig, OmegaConf

from lorafit.config import accepted_keys, target_nodes


@dataclasses.dataclass(frozen=True)
class Range:
    """Allowed numbers: bounds `ge` (>=), `gt` (>), `le` (<=), `lt` (<), None where open, and
    values allowed besides (`also`, e.g. -1 for "no limit")."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    also: tuple = ()

    def __contains__(self, value: float) -> bool:
        if value in self.also:
            return True
        return not (
            (self.ge is not None and value < self.ge)
            or (self.gt is not None and value <= self.gt)
            or (self.le is not None and value > self.le)
            or (self.lt is not None and value >= self.lt)
        )

    def __str__(self) -> str:
        low = (
            f"[{self.ge:g}"
            if self.ge is not None
            else f"({self.gt:g}"
            if self.gt is not None
            else ""
        )
        high = (
            f"{self.le:g}]"
            if self.le is not None
            else f"{self.lt:g})"
            if self.lt is not None
            else ""
        )
        if low and high:
            text = f"in {low}, {high}"
        elif low:
            text = (">= " if low[0] == "[" else "> ") + low[1:]
        else:
            text = ("<= " if high[-1] == "]" else "< ") + high[:-1]
        return " or ".join([*map(str, self.also), text])


POSITIVE, COUNT, SHARE = Range(gt=0), Range(ge=1), Range(gt=0, lt=1)
# Keys whose values must also lie in a range (None is judged by the type alone).
RANGES: dict[str, Range] = {
    "lora.r": COUNT,
    "lora.lora_alpha": POSITIVE,
    "lora.lora_dropout": Range(ge=0, lt=1),
    "optimizer.lr": POSITIVE,
    "optimizer.weight_decay": Range(ge=0),
    "optimizer.eps": POSITIVE,
    "scheduler.warmup_ratio": Range(ge=0, le=1),
    "scheduler.min_lr_rate": Range(ge=0, le=1),
    "data.batch_size": COUNT,
    "data.eval_batch_size": COUNT,
    "data.global_batch_size": COUNT,
    "data.max_length": COUNT,
    "data.micro_batch_tokens": COUNT,
    "data.block_size": COUNT,
    "data.stride": Range(ge=0),
    "data.val_fraction": SHARE,
    "data.test_fraction": SHARE,
    "data.val_examples": COUNT,
    "data.max_train_examples": COUNT,
    "data.num_samples": Range(ge=0),
    "data.num_workers": Range(ge=0),
    "trainer.max_steps": Range(ge=1, also=(-1,)),
    "trainer.max_epochs": Range(ge=1, also=(-1,)),
    "trainer.accumulate_grad_batches": COUNT,
    "trainer.gradient_clip_val": Range(ge=0),
    "trainer.log_every_n_steps": COUNT,
    "trainer.check_val_every_n_epoch": COUNT,
    "trainer.num_sanity_val_steps": Range(ge=0, also=(-1,)),
    "trainer.limit_val_batches": Range(ge=0),
    "trainer.skip_nonfinite_batches": Range(ge=0),
    "task.logits_chunk": Range(ge=0),
    "samples.num_prompts": Range(ge=0),
    "samples.max_new_tokens": COUNT,
}
# Keys that no annotation types: top-level ones and a function's **kwargs.
TYPES: dict[str, Any] = {
    "seed": int,
    "samples.num_prompts": int,
    "samples.max_new_tokens": int,
    "scheduler.min_lr_rate": float,
    "trainer.skip_nonfinite_batches": int,
    "trainer.compile": bool,
    "threads": int | None,
}


def type_hints(target: Callable) -> dict[str, Any]:
    """Annotations of the arguments `target` (a dataclass, class or function) takes; {} when they
    cannot be resolved."""
    func = target
    if isinstance(target, type) and not dataclasses.is_dataclass(target):
        func = target.__init__
    try:
        return typing.get_type_hints(func)
    except Exception:  # an annotation naming what is not importable here: judge nothing
        return {}


def fits(value: Any, tp: Any) -> bool | None:
    """Whether a config value (plain YAML: None, bool, int, float, str, list, dict) is of type `tp`;
    None when `tp` is a class no config value can be (judged by the object itself)."""
    if tp is Any or tp is inspect.Parameter.empty:
        return None
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (Union, types.UnionType):
        results = [fits(value, a) for a in args]
        return True if True in results else None if None in results else False
    if origin is Literal:
        return any(value == a and type(value) is type(a) for a in args)
    if tp is type(None):
        return value is None
    if tp in (bool, int, float, str):
        if isinstance(value, bool):
            return tp is bool
        return isinstance(value, float | int if tp is float else tp)
    container = origin or tp
    if container in (list, tuple, collections.abc.Sequence, collections.abc.Iterable):
        if not isinstance(value, list | tuple):
            return False
        if container is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                return False
            results = [fits(v, a) for v, a in zip(value, args, strict=True)]
        else:
            results = [fits(v, args[0]) for v in value] if args else []
        return False if False in results else None if None in results else True
    if container in (dict, Mapping, collections.abc.Mapping):
        if not isinstance(value, dict):
            return False
        results = [fits(v, args[1]) for v in value.values()] if len(args) == 2 else []
        return False if False in results else None if None in results else True
    return None


def describe(tp: Any) -> str:
    """A type in config words: `int`, `float or null`, `list of str`, `one of 'a', 'b'`."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (Union, types.UnionType):
        judged = [a for a in args if fits_something(a)] or args  # drop Tensor, Strategy, ...
        literals = [v for a in judged if typing.get_origin(a) is Literal for v in a.__args__]
        words = [describe(a) for a in judged if typing.get_origin(a) is not Literal]
        if literals:
            words.insert(0, describe(Literal[tuple(literals)]))
        return " or ".join(dict.fromkeys(words))
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if tp is type(None):
        return "null"
    if tp is bool:
        return "bool (true or false)"
    if origin in (list, tuple, collections.abc.Sequence, collections.abc.Iterable):
        if origin is tuple and args and args[-1] is not Ellipsis:
            return f"a list of {len(args)} ({', '.join(describe(a) for a in args)})"
        return f"a list of {describe(args[0])}" if args else "a list"
    if origin in (dict, collections.abc.Mapping):
        return f"a mapping to {describe(args[1])}" if len(args) == 2 else "a mapping"
    return getattr(tp, "__name__", str(tp))


def fits_something(tp: Any) -> bool:
    """Whether some plain config value is of type `tp` (False for a Tensor or a Strategy)."""
    probes = (None, True, 1, 1.0, "x", [], {})
    return any(fits(v, tp) is not None for v in probes)


def schedule_function(node: dict) -> Callable | None:
    """transformers' schedule function `name` (`get_scheduler`), to which `warmup_schedule` hands
    its **kwargs; None for a name transformers does not have."""
    from transformers import SchedulerType
    from transformers.optimization import TYPE_TO_SCHEDULER_FUNCTION

    try:
        return TYPE_TO_SCHEDULER_FUNCTION[SchedulerType(node.get("name", "cosine_with_min_lr"))]
    except ValueError:
        return None


# `_target_`s whose **kwargs go on to another function: node -> that function, and the arguments
# the target fills itself.
KWARGS_TARGETS: dict[str, tuple[Callable[[dict], Callable | None], tuple[str, ...]]] = {
    "lorafit.tasks.schedules.warmup_schedule": (
        schedule_function,
        ("optimizer", "num_warmup_steps", "num_training_steps"),
    ),
}


def check_kwargs_keys(resolved: dict, choices: Mapping[str, Any]) -> None:
    """Refuse a key of a `KWARGS_TARGETS` node that neither the target nor the function its
    **kwargs go to takes (`scheduler.min_lr_rat`), which would fail only when training starts.

    Raises:
        ValueError: names the key and the closest valid one, or an unknown `scheduler.name`.
    """
    for key, node in target_nodes(resolved):
        if node["_target_"] not in KWARGS_TARGETS:
            continue
        find, filled = KWARGS_TARGETS[node["_target_"]]
        passed_to = find(node)
        if passed_to is None:
            from transformers import SchedulerType

            names = ", ".join(t.value for t in SchedulerType)
            raise ValueError(f"{key}.name={node.get('name')!r} is no schedule; use one of {names}.")
        params = inspect.signature(get_object(node["_target_"])).parameters.values()
        valid = [p.name for p in params if p.kind is not p.VAR_KEYWORD]
        valid += [k for k in accepted_keys(passed_to) or [] if k not in valid]
        valid = [k for k in valid if k not in filled]
        for name in node:
            if str(name).startswith("_") or name in valid:
                continue
            close = difflib.get_close_matches(str(name), valid, n=1, cutoff=0.4)
            where = f" (set by {key}={choices[key]} or a `+{key}.{name}=...` override)"
            raise ValueError(
                f"Unknown config key {key}.{name}{where}"
                + (f" (did you mean {key}.{close[0]}?)" if close else "")
                + f": neither {node['_target_']} nor {passed_to.__module__}."
                f"{passed_to.__qualname__} takes it. Valid keys: {', '.join(valid)}."
            )


def expected_types(resolved: dict, built: Mapping[str, type]) -> dict[str, Any]:
    """`{full key: annotation}` for every key of every object node of the config, and `TYPES`."""
    expected: dict[str, Any] = dict(TYPES)
    nodes = [(key, node, get_object(node["_target_"])) for key, node in target_nodes(resolved)]
    for group, cls in built.items():
        if isinstance(resolved.get(group), dict) and "_target_" not in resolved[group]:
            nodes.append((group, resolved[group], cls))
    for key, node, target in nodes:
        hints = type_hints(target)
        if node.get("_target_") in KWARGS_TARGETS:  # the schedule's own arguments' types too
            passed_to = KWARGS_TARGETS[node["_target_"]][0](node)
            hints = {**(type_hints(passed_to) if passed_to else {}), **hints}
        for name in node:
            if not str(name).startswith("_") and name in hints:
                expected[f"{key}.{name}"] = hints[name]
    return expected


def lookup(tree: Any, key: str) -> tuple[bool, Any]:
    """`(found, value)` of a dotted key in plain containers."""
    for part in key.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return False, None
        tree = tree[part]
    return True, tree


def check_values(
    cfg: DictConfig | dict,
    choices: Mapping[str, Any],
    built: Mapping[str, type],
    overrides: Sequence[str],
) -> None:
    """Check the type and range of every config value whose type or range is known, and the keys
    that a function's **kwargs pass on (`check_kwargs_keys`).

    Args:
        cfg: the composed config (or it as plain containers), interpolations resolved here.
        choices: the group options Hydra chose, to say which file set a value.
        built: groups built as these dataclasses when their node has no `_target_`.
        overrides: the command line's overrides, to say a value came from there.

    Raises:
        ValueError: names each bad value's key, the value, the expected type and range, and where
            the value was set; or a key that `check_kwargs_keys` refuses.
    """
    resolved = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg
    check_kwargs_keys(resolved, choices)
    problems = []
    expected = expected_types(resolved, built)
    for key in sorted(set(expected) | set(RANGES)):
        found, value = lookup(resolved, key)
        if not found or (isinstance(value, dict) and "_target_" in value):
            continue
        tp, limits = expected.get(key, Any), RANGES.get(key)
        wrong_type = fits(value, tp) is False
        number = isinstance(value, int | float) and not isinstance(value, bool)
        if not wrong_type and not (limits is not None and number and value not in limits):
            continue
        want = describe(tp) if tp is not Any else "a number"
        if limits is not None:
            want += f", {limits}"
        given = next((o for o in overrides if o.lstrip("+~").startswith(f"{key}=")), None)
        group = key.split(".", 1)[0]
        where = (
            f"given as `{given}`"
            if given
            else f"set by {group}={choices[group]}"
            if choices.get(group)
            else "set in the config"
        )
        problems.append(f"{key}={value!r} ({where}): expected {want}")
    if problems:
        raise ValueError(
            "Config value(s) of the wrong type or out of range: "
            + "; ".join(problems)
            + f". Fix it on the command line (`lorafit train {problems[0].split('=')[0]}=...`) "
            "or in the config file."
        )

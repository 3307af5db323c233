"""Which layers LoRA adapts: PEFT's target matching, the task heads it leaves whole, tied heads.

A list entry matches a module name exactly or as a ``.``-suffix, a string is a regex that must match
the whole name, and ``"all-linear"`` means every Linear layer (``nn.Linear`` or transformers'
``Conv1D``) but the output head. An ``nn.Embedding`` is a target only when named. Modules trained
whole (``modules_to_save``, a task's new head) take precedence over targets, as in PEFT.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence

from torch import nn

logger = logging.getLogger(__name__)

ALL_LINEAR = "all-linear"
HEAD_NAMES = ("lm_head", "classifier", "score")  # output heads that "all-linear" leaves alone

Targets = str | Sequence[str]


class TiedEmbeddingsError(ValueError):
    """A target is an output head whose weight is tied to the input embedding's."""


def matches(name: str, targets: Targets) -> bool:
    """PEFT's rule: a regex string matches ``name`` fully; a list entry exactly or as a suffix."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def is_under(name: str, modules: Sequence[str]) -> bool:
    """True when ``name`` or a module above it matches ``modules`` (exactly or as a suffix)."""
    parts = name.split(".")
    return any(matches(".".join(parts[:i]), modules) for i in range(1, len(parts) + 1))


def is_linear(module: nn.Module) -> bool:
    """``nn.Linear`` (bitsandbytes' quantized ones included) or transformers' ``Conv1D``."""
    return isinstance(module, nn.Linear) or (
        type(module).__name__ == "Conv1D" and hasattr(module, "nf")
    )


def _not_found(entry: str, spec: Targets, model: nn.Module, linear: list[str]) -> ValueError:
    other = [f"{n} ({type(m).__name__})" for n, m in model.named_modules() if matches(n, spec)]
    hint = f" It matches only non-Linear modules: {', '.join(other[:3])}." if other else ""
    last_parts = list(dict.fromkeys(n.rsplit(".", 1)[-1] for n in linear))
    last = ", ".join(last_parts)
    named = [n for n, _ in model.named_modules() if n.endswith("." + entry)]
    if isinstance(spec, str) and named and not other:
        # A bare name as a string: e.g. `-m lora.target_modules=q_proj,v_proj` sweeps single names.
        pair = ",".join([entry, *[n for n in last_parts if n != entry][:1]])
        return ValueError(
            f"lora.target_modules={entry!r} matches no nn.Linear/Conv1D/nn.Embedding layer of "
            f"{type(model).__name__}: a string is a regex that must match the whole module name "
            f"(here e.g. {named[0]!r}), so a bare last name matches nothing; for the module list "
            f"write lora.target_modules='[{pair}]' (quotes needed in a multirun, where a bare "
            f"comma starts a sweep). Its Linear layers are: {last}."
        )
    return ValueError(
        f"lora.target_modules entry {entry!r} matches no nn.Linear, Conv1D or nn.Embedding layer "
        f"of {type(model).__name__}.{hint} Its Linear layers are: {last}. Set "
        "lora.target_modules=[...] to some of these names (an exact module name or its last "
        "part), to a regex string that fully matches module names, or to 'all-linear'."
    )


def find_targets(
    model: nn.Module,
    target_modules: Targets,
    exclude_modules: Targets | None = None,
    modules_to_save: Sequence[str] | None = None,
) -> list[str]:
    """Names of the modules that ``target_modules`` selects, in model order: Linear and Conv1D
    layers, and ``nn.Embedding`` layers that a list entry or regex names.

    Layers in or under a ``modules_to_save`` module (a task's new head, trained whole) are never
    targets: PEFT's ``modules_to_save`` takes precedence over ``target_modules`` the same way.

    Raises:
        ValueError: A list entry or a regex matches no layer LoRA can wrap, or nothing is left.
    """
    modules = dict(model.named_modules())
    linear = [n for n, m in modules.items() if n and is_linear(m)]
    adaptable = [n for n, m in modules.items() if n and (is_linear(m) or type(m) is nn.Embedding)]
    if target_modules == ALL_LINEAR:
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        names = [
            n for n in linear if modules[n] is not head and n.rsplit(".", 1)[-1] not in HEAD_NAMES
        ]
        if not names:
            raise ValueError(
                f"lora.target_modules='all-linear' finds no nn.Linear or Conv1D layer in "
                f"{type(model).__name__} besides its output head."
            )
    else:
        entries = [target_modules] if isinstance(target_modules, str) else list(target_modules)
        if not entries:
            raise ValueError("lora.target_modules is empty; name at least one module.")
        for entry in entries:
            spec = entry if isinstance(target_modules, str) else [entry]
            if not any(matches(n, spec) for n in adaptable):
                raise _not_found(entry, spec, model, linear)
        names = [n for n in adaptable if matches(n, target_modules)]
    if exclude_modules:
        names = [n for n in names if not matches(n, exclude_modules)]
    if modules_to_save:
        names = [n for n in names if not is_under(n, list(modules_to_save))]
    if not names:
        heads = f" and the heads trained whole {list(modules_to_save)}" if modules_to_save else ""
        raise ValueError(
            f"lora.exclude_modules={exclude_modules!r}{heads} removes every target; nothing to "
            "adapt."
        )
    return names


def untie_output_head(model: nn.Module, targets: list[str], untie: bool) -> None:
    """Give the output head its own weight if it or the input embedding is among ``targets`` and
    the two are tied (SmolLM2, tie_word_embeddings): a merge would otherwise change both sides.

    Raises:
        TiedEmbeddingsError: The head (or embedding) is tied and targeted, and ``untie`` is False.
    """
    get_head = getattr(model, "get_output_embeddings", None)
    get_emb = getattr(model, "get_input_embeddings", None)
    head, emb = (get_head(), get_emb()) if get_head and get_emb else (None, None)
    weight = getattr(head, "weight", None)
    if weight is None or weight is not getattr(emb, "weight", None):
        return
    names = {id(m): n for n, m in model.named_modules()}
    head_name, emb_name = names[id(head)], names[id(emb)]
    if head_name not in targets and emb_name not in targets:
        return
    target = head_name if head_name in targets else emb_name
    if not untie:
        raise TiedEmbeddingsError(
            f"lora.target_modules selects {target}, but the output head {head_name} of "
            f"{type(model).__name__} ties its weight to the input embedding {emb_name} "
            "(tie_word_embeddings): merging a LoRA there would change the other side as well. "
            f"Leave {target} out of lora.target_modules ('all-linear' does), or opt in "
            "to untying with lora.untie_word_embeddings=true (untie_embeddings=True; `lorafit "
            "merge --untie-embeddings`): the head then gets its own copy of the weight "
            "(vocab x hidden more parameters in a merged model)."
        )
    head.weight = nn.Parameter(weight.detach().clone(), requires_grad=weight.requires_grad)
    model.config.tie_word_embeddings = False  # save_pretrained / from_pretrained keep two copies
    logger.warning(
        "Untied %s from %s (untie_embeddings): the head has its own weight now, so its LoRA "
        "merges into it alone.",
        head_name,
        emb_name,
    )

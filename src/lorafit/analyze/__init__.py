"""`lorafit analyze RUN [RUN_B]`: what a trained LoRA update holds, and which rank it needed.

For every adapted layer, from the saved adapter (``adapter_config.json`` +
``adapter_model.safetensors``) and the base weights, in float32 on the CPU: the singular values of
``ΔW = scaling · B A``, its effective ranks, stable rank, size relative to ``W`` and the LoRA
paper's amplification factor, and the intruder dimensions of the tuned weight; with a second run,
the LoRA paper's subspace similarity ``φ`` between the two runs' ``A`` matrices. The formulas are in
:mod:`lorafit.analyze.spectra`; the files (``analysis.json``, ``analysis.md``, ``spectrum.png``,
``subspace_similarity.png``) in :mod:`lorafit.analyze.render`.

Only the base tensors of adapted layers are read (``safetensors.safe_open``) when the base is a
local safetensors folder, as the built-in models' cache is; any other base is loaded the way
``lorafit merge`` loads it.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import statistics
from pathlib import Path
from typing import Any

from safetensors import safe_open
from torch import Tensor

from lorafit.adapters import PEFT_PREFIX, WEIGHTS_NAME, read_adapter_config, read_weights
from lorafit.analyze import spectra
from lorafit.merge import find_adapter_dir, resolve_base

__all__ = ["ANALYSIS_NAME", "analyze", "analyze_adapter", "compare", "effective_rank"]

log = logging.getLogger(__name__)

ANALYSIS_NAME = "analysis.json"
# "<module>.lora_A.weight", or with the adapter name PEFT sometimes keeps ("lora_A.default.weight")
_LORA_KEY = re.compile(r"(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.[^.]+)?\.weight")


def layer_kind(name: str) -> tuple[str, int | None]:
    """``model.layers.3.self_attn.q_proj`` -> ``("q_proj", 3)``: the module's last name (the
    layer type a table groups by) and its first numeric part (the block index), if any."""
    parts = name.split(".")
    index = next((int(p) for p in parts if p.isdigit()), None)
    return parts[-1], index


def _pattern(pattern: dict[str, Any] | None, name: str, default: Any) -> Any:
    # PEFT's rank_pattern / alpha_pattern lookup: the first key that matches a "."-suffix.
    for key, value in (pattern or {}).items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def read_factors(
    adapter_dir: Path,
) -> tuple[dict[str, Any], dict[str, tuple[Tensor, Tensor, float]]]:
    """``adapter_config.json`` and ``{module: (lora_A (r, in), lora_B (out, r), scaling)}``.

    Each layer's rank is its tensors'; its ``lora_alpha`` comes from ``alpha_pattern`` as PEFT
    reads it; scaling is ``lora_alpha / r`` (``/ sqrt(r)`` with ``use_rslora``).

    Raises:
        FileNotFoundError, ValueError, NotImplementedError: from
            :func:`lorafit.adapters.read_adapter_config`; ValueError also when the weights file
            holds no LoRA pair (or half of one).
    """
    config = read_adapter_config(adapter_dir)
    path = adapter_dir / WEIGHTS_NAME
    pairs: dict[str, dict[str, Tensor]] = {}
    for key, t in read_weights(path).items():  # missing, truncated, corrupt: named by file
        m = _LORA_KEY.fullmatch(key.removeprefix(PEFT_PREFIX))
        if m:  # modules_to_save heads and other tensors are not low-rank updates
            pairs.setdefault(m["module"], {})[m["ab"]] = t.float()
    half = [n for n, p in pairs.items() if len(p) != 2]
    if half or not pairs:
        raise ValueError(
            f"{path}: {'no lora_A/lora_B tensors' if not pairs else f'{half[0]} lacks its pair'}"
            "; give the adapter folder `lorafit train` or PEFT wrote."
        )
    factors = {}
    for name, p in sorted(pairs.items()):
        r = p["A"].shape[0]
        alpha = _pattern(config.get("alpha_pattern"), name, config["lora_alpha"])
        scaling = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
        factors[name] = (p["A"], p["B"], float(scaling))
    return config, factors


def base_weights(base_dir: str, names: list[str], adapter_dir: Path) -> dict[str, Tensor]:
    """The base weight ``(out, in)`` of each module in ``names``, float32.

    A local folder of ``*.safetensors`` files is read tensor by tensor (``safe_open``); a saved
    key may lack the model's outer prefix (``encoder.layer.0...`` for ``bert.encoder...``). Any
    other base (a hub id, a ``.bin`` folder) is loaded whole as ``lorafit merge`` does.

    Raises:
        ValueError: A module's weight is not in the base (the adapter is for another model).
    """
    files = sorted(Path(base_dir).glob("*.safetensors")) if Path(base_dir).is_dir() else []
    if not files:
        from lorafit.merge import head_kwargs, load_base

        config = read_adapter_config(adapter_dir)
        model, _ = load_base(
            base_dir, None, config.get("task_type"), **head_kwargs(adapter_dir, config)
        )
        return {n: model.get_submodule(n).weight.detach().float() for n in names}
    where = {key: f for f in files for key in safe_open(f, framework="pt").keys()}
    out = {}
    for name in names:
        want = f"{name}.weight"
        key = want if want in where else next((k for k in where if want.endswith("." + k)), None)
        if key is None:
            raise ValueError(
                f"The base {base_dir} has no tensor {want!r}: the adapter {adapter_dir} was made "
                "for another base model; pass --base with the one it was trained on."
            )
        with safe_open(where[key], framework="pt") as f:
            out[name] = f.get_tensor(key).float()
    return out


def layer_stats(
    lora_A: Tensor,
    lora_B: Tensor,
    scaling: float,
    weight: Tensor | None,
    energy: float = 0.9,
    intruder_threshold: float = 0.5,
    intruder_top_k: int = 10,
) -> dict[str, Any]:
    """Everything `analysis.json` records about one layer (see :mod:`.spectra` for formulas).

    Args:
        lora_A, lora_B, scaling: The layer's update ``scaling · B A``.
        weight: The base ``W (out, in)``; None skips the entries that need it
            (``relative_norm``, ``amplification_factor``, intruders). A weight stored ``(in, out)``
            (transformers' ``Conv1D``) is transposed.
        energy: Energy share of ``effective_rank``.
    """
    svd = spectra.delta_svd(lora_A, lora_B, scaling)
    s = svd.S
    row: dict[str, Any] = {
        "r": lora_A.shape[0],
        "scaling": scaling,
        "shape": [lora_B.shape[0], lora_A.shape[1]],
        "singular_values": [float(f"{v:.6g}") for v in s.tolist()],
        "delta_norm": float(s.double().norm()),
        "effective_rank": spectra.energy_rank(s, energy),
        "entropy_rank": spectra.entropy_rank(s),
        "stable_rank": spectra.stable_rank(s),
    }
    if weight is None:
        return row
    if weight.shape != (lora_B.shape[0], lora_A.shape[1]) and weight.T.shape == tuple(row["shape"]):
        weight = weight.T
    weight_norm = float(weight.double().norm())
    delta = scaling * (lora_B @ lora_A)  # (out, in)
    count, max_cos = spectra.intruder_dimensions(
        weight, weight + delta, intruder_top_k, intruder_threshold
    )
    row.update(
        weight_norm=weight_norm,
        relative_norm=row["delta_norm"] / weight_norm if weight_norm else None,
        amplification_factor=spectra.amplification_factor(svd, weight),
        intruders=count,
        intruder_max_cos=max_cos,
    )
    return row


def summarize(layers: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per layer type (``q_proj``, ...) and ``all``: medians of the layer numbers, intruder totals,
    and the share of layers whose effective rank is below their ``r``."""
    groups: dict[str, list[dict]] = {}
    for name, row in layers.items():
        groups.setdefault(layer_kind(name)[0], []).append(row)
    groups["all"] = list(layers.values())
    out = {}
    for kind, rows in groups.items():

        def med(key: str, rows: list[dict] = rows) -> float | None:
            vals = [r[key] for r in rows if r.get(key) is not None]
            return statistics.median(vals) if vals else None

        out[kind] = {
            "layers": len(rows),
            "r": med("r"),
            **{k: med(k) for k in ("effective_rank", "entropy_rank", "stable_rank")},
            **{k: med(k) for k in ("relative_norm", "amplification_factor")},
            "intruders": sum(r["intruders"] for r in rows) if "intruders" in rows[0] else None,
        }
    return out


def rank_advice(layers: dict[str, dict[str, Any]], energy: float, share: float = 0.75) -> dict:
    """The smallest ``k`` such that in at least ``share`` of the layers ``energy`` of the update's
    energy lies in the top ``k`` directions, with a sentence saying what it means for ``r``."""
    ranks = sorted(row["effective_rank"] for row in layers.values())
    r = max(row["r"] for row in layers.values())
    k = ranks[max(0, math.ceil(share * len(ranks)) - 1)]
    held = sum(x <= k for x in ranks)
    pct = f"{100 * energy:g} %"
    text = (
        f"{pct} of the update's energy lies in the top {k} directions in {held} of "
        f"{len(ranks)} layers (median {statistics.median(ranks):g}); the adapter was trained "
        f"with r = {r}, "
    )
    if k == 0:
        text += "but its update is zero: it has not trained (lora_B is still all zeros)."
    elif k < r:
        text += f"so r = {k} would likely do."
    else:
        text += (
            "and the update uses all of it in most layers: a smaller r would likely lose some of "
            "it; a larger r may help (compare runs with `lorafit analyze RUN_R RUN_LARGER_R`)."
        )
    return {"k": k, "share_of_layers": held / len(ranks), "r": r, "text": text}


def analyze_adapter(
    source: str | os.PathLike,
    base: str | None = None,
    *,
    energy: float = 0.9,
    intruder_threshold: float = 0.5,
    intruder_top_k: int = 10,
    with_base: bool = True,
) -> dict[str, Any]:
    """Analyse one run's adapter (``analysis.json``'s content, less the comparison).

    Args:
        source: A run folder or an adapter folder.
        base: Base model folder or built-in name; default: the adapter's
            ``base_model_name_or_path`` (as ``lorafit merge``).
        energy: Energy share of the effective rank (0.9: 90 %).
        intruder_threshold, intruder_top_k: See :func:`spectra.intruder_dimensions`.
        with_base: Read the base weights (False: the spectrum only, no base needed).

    Raises:
        FileNotFoundError, ValueError: The folder holds no readable adapter, or the base lacks a
            layer or has it in another shape (:func:`read_factors`, :func:`base_weights`).
    """
    adapter_dir = find_adapter_dir(source)
    config, factors = read_factors(adapter_dir)
    base_dir = resolve_base(base, adapter_dir) if with_base else None
    weights = base_weights(base_dir, list(factors), adapter_dir) if base_dir else {}
    for name, w in weights.items():  # (out, in), or (in, out) for a Conv1D
        shape = (factors[name][1].shape[0], factors[name][0].shape[1])
        if shape not in (tuple(w.shape), tuple(w.T.shape)):
            raise ValueError(
                f"{adapter_dir / WEIGHTS_NAME}: layer {name!r} is {shape} (out, in) in the "
                f"adapter but {tuple(w.shape)} in the base {base_dir}: the adapter was made for "
                "another base model; pass --base with the one it was trained on."
            )
    layers = {}
    for name, (a, b, scaling) in factors.items():
        kind, index = layer_kind(name)
        stats = layer_stats(
            a, b, scaling, weights.get(name), energy, intruder_threshold, intruder_top_k
        )
        layers[name] = {"type": kind, "index": index, **stats}
    return {
        "adapter": str(adapter_dir),
        "base": base_dir,
        "r": config["r"],
        "lora_alpha": config["lora_alpha"],
        "use_rslora": config.get("use_rslora", False),
        "use_dora": bool(config.get("use_dora")),  # DoRA: the directional update B A only
        "energy": energy,
        "intruder_threshold": intruder_threshold,
        "intruder_top_k": intruder_top_k,
        "summary": summarize(layers),
        "rank_advice": rank_advice(layers, energy),
        "layers": layers,
    }


def compare(source_a: str | os.PathLike, source_b: str | os.PathLike) -> dict[str, Any]:
    """The LoRA paper's subspace similarity between two runs' ``A`` matrices, per shared layer.

    ``phi`` uses the right singular vectors of each run's ``lora_A``, as the paper does (Hu et
    al. 2021, §7.2: "the right-singular unitary matrices" of ``A_{r=8}`` and ``A_{r=64}``).
    ``phi_delta`` uses the right singular vectors of each run's ``ΔW = scaling · B A`` instead:
    the same row space, ordered by how much of the update each direction carries.

    Returns:
        ``{"run_b", "layers": {name: {"phi", "phi_delta": (r_A, r_B) nested lists, "random":
        max(r_A, r_B) / d}}, "summary": {type or "all": means of φ(1, 1), φ(1, r_B),
        φ(r_A, r_B), their random baseline, and φ_delta(1, 1)}}``.

    Raises:
        ValueError: The two adapters share no layer.
    """
    (dir_a, dir_b) = (find_adapter_dir(s) for s in (source_a, source_b))
    (_, fa), (_, fb) = read_factors(dir_a), read_factors(dir_b)
    shared = [n for n in fa if n in fb]
    if not shared:
        raise ValueError(
            f"{dir_a} and {dir_b} adapt no common layer (first: {next(iter(fa))} vs "
            f"{next(iter(fb))}); compare runs with the same base and target_modules."
        )
    layers = {}
    for name in shared:
        v_a = spectra.right_singular_vectors(fa[name][0])
        v_b = spectra.right_singular_vectors(fb[name][0])
        phi = spectra.subspace_similarity(v_a, v_b)
        delta = spectra.subspace_similarity(
            spectra.delta_svd(*fa[name]).V, spectra.delta_svd(*fb[name]).V
        )
        layers[name] = {
            "phi": [[round(x, 4) for x in row] for row in phi.tolist()],
            "phi_delta": [[round(x, 4) for x in row] for row in delta.tolist()],
            "random": max(phi.shape) / v_a.shape[0],
        }
    groups: dict[str, list[dict]] = {"all": list(layers.values())}
    for name, row in layers.items():
        groups.setdefault(layer_kind(name)[0], []).append(row)
    summary = {
        kind: {
            "phi_1_1": statistics.mean(r["phi"][0][0] for r in rows),
            "phi_1_all": statistics.mean(r["phi"][0][-1] for r in rows),
            "phi_all_all": statistics.mean(r["phi"][-1][-1] for r in rows),
            "random_all_all": statistics.mean(r["random"] for r in rows),
            "phi_delta_1_1": statistics.mean(r["phi_delta"][0][0] for r in rows),
        }
        for kind, rows in groups.items()
    }
    return {"run_b": str(dir_b), "layers": layers, "summary": summary}


def analyze(
    run: str | os.PathLike,
    run_b: str | os.PathLike | None = None,
    out: str | os.PathLike | None = None,
    *,
    base: str | None = None,
    energy: float = 0.9,
    intruder_threshold: float = 0.5,
    intruder_top_k: int = 10,
) -> dict[str, Any]:
    """Analyse ``run`` (and compare it with ``run_b``) and write the files into ``out``.

    Writes ``analysis.json``, ``analysis.md`` and ``spectrum.png``, and with ``run_b``
    ``subspace_similarity.png`` too; each file atomically. ``analysis.json`` holds run A's
    analysis and, with ``run_b``, ``b`` (run B's own, layers included) and ``compare`` (``φ``).

    Args:
        run: Run or adapter folder (A).
        run_b: A second run or adapter folder (B), e.g. r=64 beside r=8, or another seed.
        out: Folder for the files (created); default: ``run``.
        base, energy, intruder_threshold, intruder_top_k: See :func:`analyze_adapter`.

    Returns:
        ``analysis.json``'s content.
    """
    from lorafit.analyze import render

    kwargs = dict(
        energy=energy, intruder_threshold=intruder_threshold, intruder_top_k=intruder_top_k
    )
    result = {"run": str(run), **analyze_adapter(run, base, **kwargs)}
    if run_b is not None:
        result["b"] = {"run": str(run_b), **analyze_adapter(run_b, base, **kwargs)}
        result["compare"] = compare(run, run_b)
    out = Path(out if out is not None else run)
    out.mkdir(parents=True, exist_ok=True)
    render.write_all(result, out)
    return result


def effective_rank(run_dir: str | os.PathLike, energy: float = 0.9) -> float | None:
    """The median over layers of a run's effective rank at ``energy`` (the sweep report's
    column): from ``analysis.json`` when ``lorafit analyze`` wrote one at that energy, else from
    the adapter alone (no base needed; milliseconds per layer). None when the run has no
    adapter (full fine-tuning, a failed run) or it cannot be read."""
    run_dir = Path(run_dir)
    saved = run_dir / ANALYSIS_NAME
    if saved.is_file():
        try:
            data = json.loads(saved.read_text())
            if data.get("energy") == energy:
                return data["summary"]["all"]["effective_rank"]
        except (ValueError, KeyError, TypeError):
            pass  # an older or edited file: compute it again
    try:
        adapter_dir = find_adapter_dir(run_dir)
        _, factors = read_factors(adapter_dir)
    except (OSError, ValueError, NotImplementedError):
        return None
    ranks = [spectra.energy_rank(spectra.delta_svd(*f).S, energy) for f in factors.values()]
    return statistics.median(ranks)

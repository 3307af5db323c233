"""The files `lorafit analyze` writes: analysis.json, analysis.md, spectrum.png and, with two runs,
subspace_similarity.png; each through `lorafit.runinfo`'s atomic writers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from lorafit.runinfo import atomic_write, write_figure

SUMMARY_COLUMNS = [  # (key, header) of the summary tables
    ("layers", "layers"),
    ("r", "r"),
    ("effective_rank", "effective rank"),
    ("entropy_rank", "entropy rank"),
    ("stable_rank", "stable rank"),
    ("relative_norm", "‖ΔW‖/‖W‖"),
    ("amplification_factor", "amplification"),
    ("intruders", "intruders"),
]


def _fmt(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"
    return str(value)


def _types(layers: dict[str, dict]) -> dict[str, list[tuple[str, dict]]]:
    """Layers grouped by type, in first-seen type order, each group sorted by block index."""
    groups: dict[str, list[tuple[str, dict]]] = {}
    for name, row in layers.items():
        groups.setdefault(row["type"], []).append((name, row))
    for rows in groups.values():
        rows.sort(key=lambda nr: (nr[1]["index"] is None, nr[1]["index"] or 0, nr[0]))
    return groups


def _summary_table(summary: dict[str, dict]) -> list[str]:
    cols = [
        (k, h) for k, h in SUMMARY_COLUMNS if any(s.get(k) is not None for s in summary.values())
    ]
    lines = ["| type | " + " | ".join(h for _, h in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    lines += [
        f"| {kind} | " + " | ".join(_fmt(s[k]) for k, _ in cols) + " |"
        for kind, s in summary.items()
    ]
    return lines


def _header(result: dict, label: str) -> list[str]:
    adv = result["rank_advice"]
    return [
        f"{label}: `{result['adapter']}` on `{result['base'] or 'no base read'}`, "
        f"r = {result['r']}, lora_alpha = {result['lora_alpha']}"
        + (", rsLoRA" if result["use_rslora"] else "")
        + (
            " (DoRA: the directional update B A, without the magnitude)"
            if result["use_dora"]
            else ""
        )
        + ".",
        "",
        "Median over layers:",
        "",
        *_summary_table(result["summary"]),
        "",
        f"**Rank advice.** {adv['text']}",
    ]


def markdown(result: dict[str, Any]) -> str:
    """analysis.md: definitions, the rank advice, a summary table, one table per layer type, and
    with a second run its summary and the subspace similarity."""
    pct = f"{100 * result['energy']:g} %"
    lines = [
        f"# What the LoRA update learned: {result['run']}",
        "",
        f"ΔW = scaling · B A per adapted layer, float32. **effective rank**: fewest singular "
        f"directions holding {pct} of ‖ΔW‖_F²; **entropy rank**: exp(entropy of s_i / Σ s) (Roy & "
        "Vetterli 2007); **stable rank**: ‖ΔW‖_F² / ‖ΔW‖_2²; **‖ΔW‖/‖W‖**: Frobenius norms; "
        "**amplification**: ‖ΔW‖_F / ‖Uᵀ W V‖_F with U, V the top-r singular vectors of ΔW (Hu "
        f"et al. 2021, §7.3); **intruders**: of the tuned W + ΔW's top {result['intruder_top_k']} "
        f"left singular vectors, those whose |cos| with every singular vector of W is below "
        f"{result['intruder_threshold']:g} (Shuttleworth et al. 2024).",
        "",
        *_header(result, "Run"),
    ]
    if "compare" in result:
        lines += _compare_section(result)
    for kind, rows in _types(result["layers"]).items():
        has_base = "relative_norm" in rows[0][1]
        cols = ["layer", "r", "effective rank", "entropy rank", "stable rank"]
        cols += ["‖ΔW‖/‖W‖", "amplification", "intruders"] if has_base else []
        cols += ["top singular values"]
        lines += ["", f"## {kind}", "", "| " + " | ".join(cols) + " |", "|---" * len(cols) + "|"]
        for name, row in rows:
            cells = [
                str(row["index"]) if row["index"] is not None else name,
                *(_fmt(row[k]) for k in ("r", "effective_rank", "entropy_rank", "stable_rank")),
            ]
            if has_base:
                cells += [_fmt(row[k]) for k in ("relative_norm", "amplification_factor")]
                cells.append(_fmt(row["intruders"]))
            cells.append(", ".join(f"{v:.3g}" for v in row["singular_values"][:4]))
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _compare_section(result: dict) -> list[str]:
    b, cmp = result["b"], result["compare"]
    r_a, r_b = result["r"], b["r"]
    lines = ["", f"## Compared with {b['run']}", "", *_header(b, "Run B"), ""]
    lines += [
        "Subspace similarity φ(i, j) = ‖U_Aⁱᵀ U_Bʲ‖_F² / min(i, j) between the top-i and top-j "
        "right singular vectors of the two runs' lora_A (Hu et al. 2021, §7.2), mean over layers; "
        "1: one subspace inside the other, 0: orthogonal; random subspaces give max(i, j) / d. "
        "φ_ΔW: the same with the right singular vectors of each run's ΔW (ordered by the update's "
        "energy) instead of lora_A's.",
        "",
        f"| type | φ(1, 1) | φ(1, {r_b}) | φ({r_a}, {r_b}) | random φ({r_a}, {r_b}) | φ_ΔW(1, 1) |",
        "|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {kind} | {s['phi_1_1']:.3f} | {s['phi_1_all']:.3f} | {s['phi_all_all']:.3f} "
        f"| {s['random_all_all']:.3f} | {s['phi_delta_1_1']:.3f} |"
        for kind, s in cmp["summary"].items()
    ]
    return lines


def plot_spectrum(result: dict[str, Any], path: Path):
    """spectrum.png: per layer type a heat map of s_i / s_1 (rows: layers by block index; columns:
    singular value i). Returns the figure (saved and closed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    groups = _types(result["layers"])
    width = max(max(len(r["singular_values"]) for _, r in rows) for rows in groups.values())
    height = max(len(rows) for rows in groups.values())
    fig, axes = plt.subplots(
        1,
        len(groups),
        figsize=(2.2 + 2.4 * len(groups), 2 + 0.12 * height),
        squeeze=False,
        layout="constrained",
    )
    image = None
    for ax, (kind, rows) in zip(axes[0], groups.items(), strict=True):
        grid = np.full((len(rows), width), np.nan)
        for k, (_, row) in enumerate(rows):
            s = np.asarray(row["singular_values"], dtype=float)
            if s.size and s[0] > 0:
                grid[k, : s.size] = s / s[0]
        extent = (0.5, width + 0.5, len(rows) - 0.5, -0.5)
        image = ax.imshow(
            grid, aspect="auto", vmin=0, vmax=1, interpolation="nearest", extent=extent
        )
        labels = [str(r["index"]) if r["index"] is not None else n for n, r in rows]
        step = max(1, len(rows) // 10)
        ax.set_yticks(range(0, len(rows), step), labels[::step])
        ax.set(title=kind, xlabel="singular value i")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[0][0].set_ylabel("layer")
    fig.colorbar(image, ax=axes[0].tolist(), label="s_i / s_1", shrink=0.9)
    fig.suptitle(f"Singular values of ΔW (r = {result['r']}), normalised per layer")
    write_figure(fig, path)
    return fig


def plot_subspace_similarity(result: dict[str, Any], path: Path):
    """subspace_similarity.png: per layer type the mean φ(i, j) over layers (as the LoRA paper's
    Figure 3; rows i: run A, columns j: run B). Returns the figure (saved and closed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    groups: dict[str, list[list[list[float]]]] = {}
    for name, row in result["compare"]["layers"].items():
        groups.setdefault(result["layers"][name]["type"], []).append(row["phi"])
    fig, axes = plt.subplots(
        1, len(groups), figsize=(1.5 + 3 * len(groups), 3.6), squeeze=False, layout="constrained"
    )
    image = None
    for ax, (kind, grids) in zip(axes[0], groups.items(), strict=True):
        phi = np.mean(np.asarray(grids, dtype=float), axis=0)  # (r_A, r_B)
        extent = (0.5, phi.shape[1] + 0.5, phi.shape[0] + 0.5, 0.5)
        image = ax.imshow(
            phi, aspect="auto", vmin=0, vmax=1, interpolation="nearest", extent=extent
        )
        ax.set(title=f"{kind} ({len(grids)} layers)", xlabel="j (run B)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    axes[0][0].set_ylabel("i (run A)")
    fig.colorbar(image, ax=axes[0].tolist(), label="φ(i, j)", shrink=0.9)
    fig.suptitle(
        f"Subspace similarity of lora_A: r = {result['r']} (A) vs r = {result['b']['r']} (B)"
    )
    write_figure(fig, path)
    return fig


def write_all(result: dict[str, Any], out: Path) -> list[Path]:
    """Write analysis.json, analysis.md, spectrum.png (and subspace_similarity.png) into `out`."""
    written = [
        atomic_write(out / "analysis.json", json.dumps(result, indent=1) + "\n"),
        atomic_write(out / "analysis.md", markdown(result)),
    ]
    plot_spectrum(result, out / "spectrum.png")
    written.append(out / "spectrum.png")
    if "compare" in result:
        plot_subspace_similarity(result, out / "subspace_similarity.png")
        written.append(out / "subspace_similarity.png")
    return written

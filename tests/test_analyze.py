"""`lorafit analyze`: the spectra of a LoRA update against hand computations on tiny matrices, and
the whole command on tiny trained runs (one run, and two runs compared)."""

import json
import math

import pytest
import torch
import yaml
from safetensors.torch import save_file

from lorafit.analyze import analyze, analyze_adapter, compare, effective_rank, spectra
from lorafit.cli import main as cli
from lorafit.report import summarize, write_report
from tiny_runs import EXACT, save_tiny_smol, train_run

SIGMA = torch.tensor([3.0, 2.0, 1.5])  # energies 9, 4, 2.25: the top 2 hold 85 %, all 3 hold 100 %


def orthonormal(rows: int, cols: int, seed: int) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)))
    return q


def rank3_factors(scaling: float = 2.0):
    """A rank-4 adapter whose update is exactly U diag(SIGMA) Vᵀ (rank 3): B's 4th column is 0."""
    u, v = orthonormal(12, 3, 0), orthonormal(10, 3, 1)  # (out, 3), (in, 3)
    lora_B = torch.cat([u * SIGMA / scaling, torch.zeros(12, 1)], dim=1)  # (12, 4)
    extra = torch.randn(1, 10, generator=torch.Generator().manual_seed(2))
    lora_A = torch.cat([v.T, extra])  # (4, 10)
    return lora_A, lora_B, u, v


def test_a_known_rank_3_update_has_effective_rank_3_and_the_hand_computed_numbers():
    lora_A, lora_B, u, v = rank3_factors(scaling=2.0)
    svd = spectra.delta_svd(lora_A, lora_B, 2.0)
    dense = torch.linalg.svdvals(2.0 * lora_B @ lora_A)
    assert torch.allclose(svd.S, dense[:4], atol=1e-5)  # the QR route equals the dense SVD
    assert torch.allclose(svd.S[:3], SIGMA, atol=1e-5) and svd.S[3] < 1e-5
    assert spectra.energy_rank(svd.S, 0.9) == 3
    assert spectra.energy_rank(svd.S, 0.85) == 2  # 13 / 15.25 = 0.852
    p = SIGMA / SIGMA.sum()
    assert spectra.entropy_rank(svd.S) == pytest.approx(math.exp(-(p * p.log()).sum()), rel=1e-5)
    assert spectra.stable_rank(svd.S) == pytest.approx(15.25 / 9, rel=1e-5)
    # amplification (Hu et al. §7.3): ‖ΔW‖_F / ‖Uᵀ W V‖_F over the update's 3 real directions
    w = torch.randn(12, 10, generator=torch.Generator().manual_seed(3))
    hand = math.sqrt(15.25) / float((u.T @ w @ v).norm())
    assert spectra.amplification_factor(svd, w, rank=3) == pytest.approx(hand, rel=1e-4)
    assert spectra.amplification_factor(spectra.delta_svd(lora_A, 0 * lora_B, 2.0), w) is None


def test_subspace_similarity_matches_the_hand_computation():
    """A's top right singular vectors are e1, e2; B's are cosθ e1 + sinθ e3, then e2."""
    theta, e = 0.6, torch.eye(5)
    a = torch.stack([3 * e[0], 1 * e[1]])  # (2, 5)
    b = torch.stack([5 * (math.cos(theta) * e[0] + math.sin(theta) * e[2]), 2 * e[1]])
    phi = spectra.subspace_similarity(
        spectra.right_singular_vectors(a), spectra.right_singular_vectors(b)
    )
    c2 = math.cos(theta) ** 2
    assert torch.allclose(phi, torch.tensor([[c2, c2], [c2, (c2 + 1) / 2]]), atol=1e-6)
    same = spectra.right_singular_vectors(torch.randn(4, 9))
    assert torch.allclose(spectra.subspace_similarity(same, same).diagonal(), torch.ones(4))


def test_intruder_dimensions_flag_a_new_direction_and_nothing_without_an_update():
    w = torch.diag(torch.arange(12, 0, -1).float())  # singular vectors: the standard basis
    assert spectra.intruder_dimensions(w, w.clone()) == (0, [1.0] * 10)
    u = torch.zeros(12)
    u[:9] = 1 / 3  # |cos| 1/3 with e1..e9, 0 with the rest
    count, max_cos = spectra.intruder_dimensions(w, w + 1000 * torch.outer(u, u))
    assert count >= 1 and max_cos[0] == pytest.approx(1 / 3, abs=0.01)
    assert spectra.energy_rank(torch.zeros(3)) == 0 and spectra.entropy_rank(torch.zeros(3)) == 0


def write_adapter(folder, factors: dict, r: int, lora_alpha: float, base: str | None = None):
    """A PEFT adapter folder holding the given `{module: (lora_A, lora_B)}`."""
    folder.mkdir(parents=True)
    config = {"peft_type": "LORA", "r": r, "lora_alpha": lora_alpha, "target_modules": ["proj"]}
    config["base_model_name_or_path"] = base
    (folder / "adapter_config.json").write_text(json.dumps(config))
    tensors = {}
    for name, (a, b) in factors.items():
        tensors[f"base_model.model.{name}.lora_A.weight"] = a.contiguous()
        tensors[f"base_model.model.{name}.lora_B.weight"] = b.contiguous()
    save_file(tensors, folder / "adapter_model.safetensors")
    return folder


def test_a_saved_adapter_and_base_give_the_same_numbers_as_the_maths(tmp_path):
    lora_A, lora_B, u, v = rank3_factors(scaling=2.0)  # r=4, lora_alpha=8: scaling 2
    w = torch.randn(12, 10, generator=torch.Generator().manual_seed(3))
    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text("{}")
    save_file({"model.layers.0.proj.weight": w}, base / "model.safetensors")
    adapter = write_adapter(
        tmp_path / "run/adapter", {"model.layers.0.proj": (lora_A, lora_B)}, 4, 8, str(base)
    )
    result = analyze_adapter(tmp_path / "run")
    row = result["layers"]["model.layers.0.proj"]
    assert (row["type"], row["index"], row["effective_rank"]) == ("proj", 0, 3)
    delta = 2.0 * lora_B @ lora_A
    assert row["relative_norm"] == pytest.approx(float(delta.norm() / w.norm()), rel=1e-5)
    s = spectra.delta_svd(lora_A, lora_B, 2.0)
    assert row["amplification_factor"] == pytest.approx(
        spectra.amplification_factor(s, w), rel=1e-6
    )
    assert (
        result["rank_advice"]["k"] == 3 and "r = 3 would likely do" in result["rank_advice"]["text"]
    )
    # φ of an adapter with itself: identical subspaces
    same = compare(adapter, adapter)["layers"]["model.layers.0.proj"]
    assert [same["phi"][i][i] for i in range(4)] == pytest.approx([1.0] * 4, abs=1e-4)
    # ΔW's 4th direction is a null direction, arbitrary in the 7 left: only the top 3 must agree
    assert [same["phi_delta"][i][i] for i in range(3)] == pytest.approx([1.0] * 3, abs=1e-4)
    assert effective_rank(tmp_path / "run") == 3  # the report's column, from the adapter alone


# -- end to end on tiny trained runs -------------------------------------------------------------


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory, smol_tokenizer):
    """Two 3-step runs of a tiny Llama with the real tokenizer: r=2 and r=4, same seed."""
    root = tmp_path_factory.mktemp("analyze")
    tiny = save_tiny_smol(root / "model", smol_tokenizer)
    common = [
        "model=hf",
        f"model.name_or_path={tiny}",
        "data.max_train_examples=16",
        "trainer.max_steps=3",
        "trainer.limit_val_batches=1",
        "eval.general_docs=8",
        "optimizer.lr=0.05",  # a visible update in 3 steps
        *EXACT,
    ]
    runs = []
    for job, r in enumerate((2, 4)):
        run = root / "sweep" / str(job)
        metrics = train_run(run, *common, f"lora.r={r}", f"lora.lora_alpha={2 * r}")
        (run / ".hydra").mkdir(exist_ok=True)  # what `lorafit report` looks for
        (run / ".hydra/config.yaml").write_text(yaml.safe_dump({"lora": {"r": r}}))
        runs.append((run, metrics))
    return runs


@pytest.mark.slow
def test_analyze_writes_every_output_for_one_run(two_runs):
    (run, _), _ = two_runs
    result = analyze(run)
    for name in ("analysis.json", "analysis.md", "spectrum.png"):
        assert (run / name).is_file(), name
    assert not (run / "subspace_similarity.png").exists()
    layers = result["layers"]
    assert len(layers) == 8  # 2 blocks x q, k, v, o
    assert all(1 <= row["effective_rank"] <= 2 and row["r"] == 2 for row in layers.values())
    assert all(row["relative_norm"] > 0 and 0 <= row["intruders"] <= 10 for row in layers.values())
    saved = json.loads((run / "analysis.json").read_text())
    assert saved["summary"]["all"]["layers"] == 8
    md = (run / "analysis.md").read_text()
    assert "**Rank advice.**" in md and "## q_proj" in md and "## o_proj" in md


@pytest.mark.slow
def test_analyze_two_runs_on_the_command_line(two_runs, tmp_path):
    (run_a, _), (run_b, _) = two_runs
    out = tmp_path / "pair"
    assert cli(["analyze", str(run_a), str(run_b), "--out", str(out)]) == 0
    for name in ("analysis.json", "analysis.md", "spectrum.png", "subspace_similarity.png"):
        assert (out / name).is_file(), name
    result = json.loads((out / "analysis.json").read_text())
    assert result["b"]["r"] == 4
    for row in result["compare"]["layers"].values():
        phi = torch.tensor(row["phi"])
        assert phi.shape == (2, 4) and bool(((phi >= 0) & (phi <= 1 + 1e-4)).all())
    assert "Compared with" in (out / "analysis.md").read_text()
    assert cli(["analyze", str(tmp_path / "nothing")]) == 1  # a clear error, no traceback


@pytest.mark.slow
def test_general_loss_before_after_in_metrics_and_the_sweep_report(two_runs):
    (run, metrics), (run_b, _) = two_runs
    before, after = metrics["general_loss_before"], metrics["general_loss_after"]
    assert math.isfinite(before) and before != after  # the update moved the model off its task
    assert metrics["general_loss_increase"] == pytest.approx(after - before)
    root = run.parent
    rows = write_report(root)
    assert [r["effective_rank"] for r in rows] == [effective_rank(run), effective_rank(run_b)]
    assert rows[0]["general_loss_before"] == before
    assert (root / "forgetting.png").is_file()
    assert "## Analysis" in (root / "summary.md").read_text()
    assert summarize(root)[1]["effective_rank"] <= 4

"""A save that fails half-way (disk full, a library raising mid-write) leaves the previous file or
folder whole and readable, and no partial folder or temp file behind: `lorafit.runinfo`'s
`atomic_write`/`atomic_writer`, `atomic_write_files` and `staged_dir`, as the adapter, the full
model (`model/`) and the merged export use them."""

import errno
import os
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

import lorafit.merge
from lorafit import runinfo
from lorafit.adapters import load_adapter, save_adapter
from lorafit.artifacts import save_full_model
from lorafit.lora import inject_lora, lora_modules
from lorafit.merge import merge_to_folder

ATTN = ["q_proj", "v_proj"]
SMOL_VOCAB = 49152


def disk_full() -> OSError:
    return OSError(errno.ENOSPC, "No space left on device")


def fail_fsync_after(monkeypatch, calls: int) -> None:
    """`os.fsync` works `calls` times, then fails as on a full disk."""
    real, count = os.fsync, {"n": 0}

    def fsync(fd):
        count["n"] += 1
        if count["n"] > calls:
            raise disk_full()
        return real(fd)

    monkeypatch.setattr(runinfo.os, "fsync", fsync)


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` by relative path."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def hidden(folder: Path) -> list[str]:
    """Temp leftovers: lorafit's temp files and folders all start with a dot."""
    return sorted(p.name for p in folder.rglob(".*"))


def lora_llama(make_llama, seed: int, **kw) -> nn.Module:
    model = make_llama(**kw)
    inject_lora(model, ATTN, r=4, lora_alpha=8)
    torch.manual_seed(seed)
    with torch.no_grad():
        for _, m in lora_modules(model):
            nn.init.normal_(m.lora_B, std=0.05)
    return model


def save(model: nn.Module, out: Path, **kw) -> Path:
    args = dict(r=4, lora_alpha=8, lora_dropout=0.0, use_rslora=False, target_modules=ATTN)
    return save_adapter(model, out, base_model_name_or_path=None, **args, **kw)


def test_atomic_write_on_a_full_disk_keeps_the_old_file(tmp_path, monkeypatch):
    path = runinfo.atomic_write(tmp_path / "metrics.json", "old\n")
    fail_fsync_after(monkeypatch, 0)
    with pytest.raises(OSError, match="No space left"):
        runinfo.atomic_write(path, b"new, longer content\n")
    assert path.read_text() == "old\n" and hidden(tmp_path) == []


def test_atomic_writer_streams_and_an_interrupt_mid_stream_keeps_the_old_file(tmp_path):
    path = tmp_path / "last.ckpt"
    with runinfo.atomic_writer(path) as fh:
        torch.save({"step": 1}, fh)
    with pytest.raises(KeyboardInterrupt):
        with runinfo.atomic_writer(path) as fh:
            torch.save({"step": 2, "state": torch.zeros(1000)}, fh)
            raise KeyboardInterrupt  # Ctrl-C after the bytes were written, before the rename
    assert torch.load(path) == {"step": 1} and hidden(tmp_path) == []


def test_a_failed_adapter_save_leaves_the_previous_adapter_whole(
    make_llama, input_ids, smol_tokenizer, tmp_path, monkeypatch
):
    out = tmp_path / "run" / "adapter"
    first = lora_llama(make_llama, seed=1)
    save(first, out, tokenizer=smol_tokenizer)
    before = snapshot(out)
    assert {"adapter_model.safetensors", "adapter_config.json", "tokenizer.json"} <= set(before)
    # The second save writes its weights file in full, then the disk is full on the next file.
    fail_fsync_after(monkeypatch, 1)
    with pytest.raises(OSError, match="No space left"):
        save(lora_llama(make_llama, seed=2), out, tokenizer=smol_tokenizer)
    monkeypatch.undo()
    assert snapshot(out) == before and hidden(tmp_path) == []
    loaded = make_llama()
    load_adapter(loaded, out)
    assert torch.equal(loaded(input_ids).logits, first(input_ids).logits)
    # and the same save with room on the disk replaces it: the failure was the only reason
    save(lora_llama(make_llama, seed=2), out, tokenizer=smol_tokenizer)
    changed = snapshot(out)
    assert changed["adapter_model.safetensors"] != before["adapter_model.safetensors"]
    assert changed["tokenizer.json"] == before["tokenizer.json"] and hidden(tmp_path) == []


def test_a_failed_first_adapter_save_leaves_no_folder(make_llama, tmp_path, monkeypatch):
    fail_fsync_after(monkeypatch, 1)
    with pytest.raises(OSError, match="No space left"):
        save(lora_llama(make_llama, seed=1), tmp_path / "adapter")
    assert list(tmp_path.iterdir()) == []


def test_a_failed_full_model_save_leaves_the_previous_model_whole(
    make_llama, smol_tokenizer, tmp_path
):
    out = tmp_path / "run" / "model"
    first = make_llama(seed=1, vocab_size=SMOL_VOCAB)
    save_full_model(first, smol_tokenizer, out)
    before = snapshot(out)

    class HalfWayTokenizer:  # writes one file, then the disk is full
        def save_pretrained(self, folder):
            (Path(folder) / "tokenizer_config.json").write_text("{")
            raise disk_full()

    with pytest.raises(OSError, match="No space left"):
        save_full_model(make_llama(seed=2, vocab_size=SMOL_VOCAB), HalfWayTokenizer(), out)
    assert snapshot(out) == before and hidden(tmp_path) == []
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    for (name, got), want in zip(
        reloaded.state_dict().items(), first.state_dict().values(), strict=True
    ):
        assert torch.equal(got, want), name


def test_a_failed_merge_overwrite_leaves_the_previous_export_whole(
    make_llama, smol_tokenizer, tmp_path, monkeypatch
):
    base = tmp_path / "base"
    make_llama(vocab_size=SMOL_VOCAB).save_pretrained(base)
    smol_tokenizer.save_pretrained(base)
    adapters = []
    for seed in (1, 2):
        model = lora_llama(make_llama, seed=seed, vocab_size=SMOL_VOCAB)
        adapters.append(save(model, tmp_path / f"adapter{seed}"))
    out = tmp_path / "merged"
    merge_to_folder([adapters[0]], out, base=str(base))
    before = snapshot(out)
    real = lorafit.merge.save_model

    def save_then_fail(model, tokenizer, folder):  # the weights are written, then a failure
        real(model, tokenizer, folder)
        raise disk_full()

    monkeypatch.setattr(lorafit.merge, "save_model", save_then_fail)
    with pytest.raises(OSError, match="No space left"):
        merge_to_folder([adapters[1]], out, base=str(base), overwrite=True)
    assert snapshot(out) == before and hidden(tmp_path) == []
    assert AutoModelForCausalLM.from_pretrained(out) is not None


def test_staged_dir_puts_the_old_folder_back_when_the_final_rename_fails(tmp_path, monkeypatch):
    out = tmp_path / "adapter"
    with runinfo.staged_dir(out) as tmp:
        (tmp / "a.txt").write_text("old")
    real = os.replace

    def replace(src, dst):
        if Path(src).name.endswith(".tmp") and Path(dst) == out:
            raise OSError(errno.EACCES, "Permission denied")
        return real(src, dst)

    monkeypatch.setattr(runinfo.os, "replace", replace)
    with pytest.raises(OSError, match="Permission denied"):
        with runinfo.staged_dir(out) as tmp:
            (tmp / "a.txt").write_text("new")
    assert snapshot(out) == {"a.txt": b"old"} and hidden(tmp_path) == []

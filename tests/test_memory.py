"""`peak_rss_mb` compares runs: it counts from after the model is loaded, so neither the one-time
GGUF conversion nor what earlier runs of a sequential multirun left behind is in it."""

import gc
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from lorafit import runinfo

MB = 2**20
BIG = 400  # MiB, far above the noise of a test process


def _resettable() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


pytestmark = pytest.mark.skipif(
    not _resettable(), reason="the kernel's peak-RSS counter (Linux VmHWM) cannot be reset here"
)


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def transient(mb: int = BIG) -> None:
    """Touch `mb` MiB and free them: a peak such as a GGUF conversion leaves."""
    block = bytearray(mb * MB)
    block[::4096] = b"x" * len(range(0, mb * MB, 4096))
    del block


def test_peak_count_restarts_without_the_garbage_an_earlier_run_left():
    gc.disable()  # an earlier run's model held in a reference cycle, not yet collected
    try:
        garbage = {"weights": bytearray(BIG * MB)}
        garbage["weights"][::4096] = b"x" * len(range(0, BIG * MB, 4096))
        garbage["self"] = garbage
        del garbage
        base = rss_mb()
        runinfo.reset_peak_rss("run start")
        assert runinfo.peak_rss_mb() < base - BIG / 2  # collected before the count restarts
    finally:
        gc.enable()
    assert runinfo.peak_rss_scope() == "process peak since run start"


def test_build_counts_the_peak_from_after_model_load(monkeypatch, make_llama, smol_dir):
    """A conversion (or loader) peak before the model is in memory is not the run's peak."""
    from lorafit import train
    from lorafit.config import CONF_DIR
    from lorafit.tasks.causal_lm import CausalLMModule

    def converting_resolve(model_cfg):
        transient()  # the one-time GGUF -> safetensors conversion of a sweep's first run
        return smol_dir

    def loading(model_dir, model_cfg, task, **kwargs):
        transient()  # from_pretrained's own peak
        return make_llama()

    monkeypatch.setattr(train, "resolve_model_dir", converting_resolve)
    monkeypatch.setattr(train, "load_model", loading)
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("train", overrides=["data.max_train_examples=8", "samples.num_prompts=0"])
    runinfo.reset_peak_rss("run start")
    base = rss_mb()
    train.build(cfg, CausalLMModule)
    assert runinfo.peak_rss_mb() < base + BIG / 2
    assert runinfo.peak_rss_scope() == "process peak since model load"

"""Runner of the `data` area: files a data module reads.

Each case builds the data module as `lorafit train data=file data.path=<the case's file> ...` would:
the real `train` config composed with Hydra's compose API and the case's overrides, `cfg.data`
instantiated with the real SmolLM2 tokenizer, then `setup("fit")`. Only lorafit's own errors are
caught (ValueError / OSError subclasses defined in lorafit); anything else (an exception from
inside a library) propagates and fails the case.

Returns, for `expect: error`, `TypeName: message`; for `expect: skip`, the data stats (as
metrics.json's `data` has them), the messages logged while reading, and for causal-LM data two
checks on what survived: `end-of-turn supervised: k/n` (answers whose end-of-turn token carries a
label) and `loss: finite` (a tiny random model's loss on one collated batch).

case.yaml keys (besides kind / expect / message):
    file: the bad file, in the case folder (default: the one file there besides case.yaml).
    data: the data config (default `file`; `csv_classification` for the classifier's reader).
    overrides: more Hydra overrides (`data.encoding_errors=replace`, ...).
    tokenizer: attributes set on the tokenizer first (`pad_token: null`, `chat_template: null`).
"""

import json
import logging
import math
from functools import cache
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from lorafit.config import CONF_DIR
from lorafit.data.encoding import IGNORE_INDEX, lm_collator
from lorafit.models import resolve_model_dir


@cache
def smol_dir() -> str:
    return resolve_model_dir(OmegaConf.load(f"{CONF_DIR}/model/smollm2_135m.yaml"))


@cache
def tiny_model(vocab: int) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=vocab,
    )
    return LlamaForCausalLM(config).eval()


def case_file(case_dir: Path, case: dict) -> Path:
    if "file" in case:
        return case_dir / case["file"]
    (only,) = [p for p in case_dir.iterdir() if p.name != "case.yaml"]
    return only


def build(case_dir: Path, case: dict, tmp_path: Path):
    """The case's data module, instantiated from the composed config (not yet set up)."""
    data = case.get("data", "file")
    overrides = [f"data={data}", f"data.path={case_file(case_dir, case)}"]
    if data == "file":  # the classifier's module keeps no tokenization cache
        overrides.append(f"data.cache_dir={tmp_path / 'cache'}")
    overrides += [str(o) for o in case.get("overrides", [])]
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    tok = AutoTokenizer.from_pretrained(smol_dir())
    for name, value in (case.get("tokenizer") or {}).items():
        setattr(tok, name, value)
    extra = {"num_samples": 0} if data == "file" else {}
    return instantiate(cfg.data, tokenizer=tok, seed=cfg.seed, **extra)


def is_lorafit_error(e: BaseException) -> bool:
    return isinstance(e, ValueError | OSError) and type(e).__module__.startswith("lorafit.")


def lm_checks(dm) -> list[str]:
    """`end-of-turn supervised: k/n` over the training examples' answers; `loss: finite|nan`."""
    rows = list(dm.train_set)
    batch = lm_collator(dm.tokenizer)(rows[:8])
    eos = dm.tokenizer.eos_token_id
    ends = supervised = 0
    for ex in rows:
        labels = ex["labels"]
        for i in range(1, len(labels)):
            if labels[i - 1] != IGNORE_INDEX and ex["input_ids"][i] == eos:
                ends += 1  # the token after an answer's last labelled token is its end of turn
                supervised += labels[i] == eos
    with torch.no_grad():
        loss = tiny_model(len(dm.tokenizer))(**batch).loss.item()
    finite = "finite" if math.isfinite(loss) else loss
    return [f"end-of-turn supervised: {supervised}/{ends}", f"loss: {finite}"]


def run(case_dir: Path, case: dict, tmp_path: Path) -> str:
    records: list[str] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = lambda r: records.append(r.getMessage())
    logger = logging.getLogger("lorafit")
    level, logger.level = logger.level, logging.INFO
    logger.addHandler(handler)
    try:
        dm = build(case_dir, case, tmp_path)
        dm.setup("fit")
    except Exception as e:
        if not is_lorafit_error(e):
            raise
        assert case["expect"] == "error", f"{case_dir.name}: unexpected error {e}"
        return f"{type(e).__name__}: {e}"
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    assert case["expect"] == "skip", f"{case_dir.name}: no error; stats {dm.stats}"
    checks = lm_checks(dm) if dm.task == "causal_lm" else []
    return "\n".join([json.dumps(dm.stats, default=str), *records, *checks])

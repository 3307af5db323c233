"""Shared fixtures: tiny random Llama models built from config (no weights read)."""

import os
from collections.abc import Callable

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

# The forgetting probe (`eval.general_docs`, 200 BBC documents by default) on 8 documents in every
# run the tests start, subprocesses included: the probe is tested on its own (test_general_loss).
os.environ.setdefault("LORAFIT_GENERAL_DOCS", "8")

TINY_LLAMA = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=128,
)
TINY_BERT = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    vocab_size=100,
    max_position_embeddings=32,
)


@pytest.fixture
def make_llama() -> Callable[..., LlamaForCausalLM]:
    """Build a tiny Llama in eval mode; the same seed and overrides give the same weights."""

    def make(seed: int = 0, cls: type = LlamaForCausalLM, **overrides) -> LlamaForCausalLM:
        torch.manual_seed(seed)
        return cls(LlamaConfig(**{**TINY_LLAMA, **overrides})).eval()

    return make


@pytest.fixture
def input_ids() -> torch.Tensor:
    """A (2, 10) batch of token ids."""
    generator = torch.Generator().manual_seed(1)
    return torch.randint(0, TINY_LLAMA["vocab_size"], (2, 10), generator=generator)


@pytest.fixture(scope="session")
def smol_dir() -> str:
    """The built-in SmolLM2-135M-Instruct as a local safetensors folder (converted once, cached)."""
    from omegaconf import OmegaConf

    from lorafit.config import CONF_DIR
    from lorafit.models import resolve_model_dir

    return resolve_model_dir(OmegaConf.load(f"{CONF_DIR}/model/smollm2_135m.yaml"))


@pytest.fixture(scope="session")
def smol_tokenizer(smol_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smol_dir)

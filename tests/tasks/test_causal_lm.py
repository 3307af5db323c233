"""The causal-LM loss and the learning-rate schedules, on small hand-checkable tensors."""

import math

import pytest
import torch
import torch.nn.functional as F

from lorafit.data.encoding import IGNORE_INDEX
from lorafit.tasks.causal_lm import causal_lm_loss
from lorafit.tasks.schedules import warmup_schedule


def test_loss_is_shifted_mean_over_labelled_tokens_only():
    torch.manual_seed(0)
    logits = torch.randn(2, 6, 11, requires_grad=True)
    labels = torch.randint(0, 11, (2, 6))
    labels[0, :4] = IGNORE_INDEX  # a prompt
    labels[1, 5] = IGNORE_INDEX  # padding
    loss, n = causal_lm_loss(logits, labels)
    # Position t-1 predicts token t; by hand over the 2 + 4 labelled targets (t >= 1).
    pairs = [(0, 4), (0, 5), (1, 1), (1, 2), (1, 3), (1, 4)]
    want = torch.stack([F.cross_entropy(logits[b, t - 1], labels[b, t]) for b, t in pairs]).mean()
    assert n == 6 and torch.allclose(loss, want, atol=1e-6)
    loss.backward()
    assert logits.grad[0, :3].abs().sum() == 0 and logits.grad[0, 3].abs().sum() > 0
    assert logits.grad[:, -1].abs().sum() == 0  # the last position predicts nothing


def test_loss_of_bf16_logits_is_computed_in_float32():
    logits = torch.randn(1, 4, 50_000).to(torch.bfloat16)
    labels = torch.tensor([[IGNORE_INDEX, 5, 6, 7]])
    loss, n = causal_lm_loss(logits, labels)
    want = F.cross_entropy(logits[0, :3].float(), labels[0, 1:])
    assert loss.dtype == torch.float32 and n == 3 and torch.allclose(loss, want)


def test_no_labelled_token_gives_zero_not_nan():
    loss, n = causal_lm_loss(torch.randn(2, 3, 5), torch.full((2, 3), IGNORE_INDEX))
    assert n == 0 and loss.item() == 0.0


@pytest.mark.parametrize("steps", [20, 100])
def test_cosine_warmup_shape(steps):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = warmup_schedule(opt, steps, "cosine_with_min_lr", warmup_ratio=0.1, min_lr_rate=0.1)
    lrs = []
    for _ in range(steps):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    warmup = math.ceil(steps * 0.1)
    # step s runs at (s + 1) / warmup of the lr: the first step already learns
    assert lrs[:warmup] == pytest.approx([(s + 1) / warmup for s in range(warmup)])
    assert lrs[warmup - 1] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[warmup:], lrs[warmup + 1 :], strict=False))
    half = warmup + (steps - warmup) // 2
    assert lrs[half - 1] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)), abs=0.05)
    assert lrs[-1] == pytest.approx(0.1, abs=0.01)


def test_constant_with_warmup():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2.0)
    sched = warmup_schedule(opt, 10, "constant_with_warmup", warmup_ratio=0.4)
    lrs = []
    for _ in range(10):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([0.5, 1.0, 1.5] + [2.0] * 7)


def test_a_one_step_run_trains_at_the_full_rate():
    """transformers' schedules start at lr 0; a 1-step run (or the first step) must still learn."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2.0)
    warmup_schedule(opt, 1, "cosine_with_min_lr", warmup_ratio=0.05, min_lr_rate=0.1)
    assert opt.param_groups[0]["lr"] == pytest.approx(2.0)


def test_no_warmup_starts_at_the_full_rate():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2.0)
    warmup_schedule(opt, 10, "constant_with_warmup", warmup_ratio=0.0)
    assert opt.param_groups[0]["lr"] == 2.0

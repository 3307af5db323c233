"""LoRA initialisations (``lora.init``, PEFT's ``init_lora_weights`` values).

- ``default``: A Kaiming-uniform, B zeros (loralib, PEFT's ``True``).
- ``gaussian``: A normal with std ``1 / r``, B zeros (PEFT's ``"gaussian"``).
- ``pissa`` (Meng et al. 2024): the top-r singular triplets of ``W = U S V^T`` go into the
  adapter, ``B = U_r sqrt(S_r / s)``, ``A = sqrt(S_r / s) V_r^T``, and the base keeps the residual
  ``W - s B A``; ``pissa_niter_N`` uses torch's randomised ``svd_lowrank`` with N iterations.
- ``olora`` (Büyükakyüz 2024): ``W = Q R``, ``B = Q[:, :r]``, ``A = R[:r]``, residual in the base.

Both PiSSA and OLoRA change the base weights. The layer keeps float32 copies of its initial A and B
(``initial_A``/``initial_B``, buffers that are not saved and not trained) so that the saved adapter
can be converted to a plain LoRA of rank 2r on the *original* base (:func:`converted_lora`, PEFT's
``save_pretrained(path_initial_model_for_weight_conversion=...)``), and so that a disabled layer
still computes the original base (``W_res + s B0 A0``).
"""

from __future__ import annotations

import re

import torch
from torch import Tensor

from lorafit.lora.layers import LoRAEmbedding, LoRALinear, is_quantized

INITS = ("default", "gaussian", "pissa", "olora")
BASE_CHANGING = ("pissa", "olora")
_PISSA_FAST = re.compile(r"pissa_niter_(\d+)")


def check_init(init: object) -> str:
    """The init's family name (``pissa`` for ``pissa_niter_N``).

    Raises:
        ValueError: Not one of :data:`INITS` (or ``pissa_niter_N``); names ``lora.init``.
    """
    if isinstance(init, str) and (init in INITS or _PISSA_FAST.fullmatch(init)):
        return "pissa" if init.startswith("pissa") else init
    raise ValueError(
        f"lora.init={init!r} is not an initialisation lorafit knows; use one of "
        f"{', '.join(INITS)} or pissa_niter_N (PiSSA by randomised SVD with N iterations)."
    )


@torch.no_grad()
def init_lora(module: LoRALinear | LoRAEmbedding, init: str) -> None:
    """Initialise ``module``'s A and B as ``init`` says (PEFT's formulas; see the module doc).

    Raises:
        ValueError: Unknown ``init``; PiSSA/OLoRA on an embedding, on a quantized base, with DoRA
            or on the meta device.
    """
    family = check_init(init)
    if family == "default":
        return  # the layer's own reset_lora_parameters
    if isinstance(module, LoRAEmbedding):
        raise ValueError(
            f"lora.init={init!r} on an nn.Embedding target: PEFT initialises embeddings only the "
            "default way (A zeros, B normal); leave the embedding out or use lora.init=default."
        )
    if family == "gaussian":
        torch.nn.init.normal_(module.lora_A, std=1 / module.r)
        torch.nn.init.zeros_(module.lora_B)
        return
    if module.use_dora:
        raise ValueError(
            f"lora.init={init!r} with lora.use_dora=true: the conversion of a base-changing init "
            "back to the original base (PEFT's) covers plain LoRA only; use one or the other."
        )
    if is_quantized(module.base_layer):
        raise ValueError(
            f"lora.init={init!r} with a quantized base (model.quantization): the residual would "
            "have to be re-quantized; use lora.init=default or model.quantization=null."
        )
    w = module.weight()
    if w.is_meta:
        raise ValueError(f"lora.init={init!r} needs real weights, not the meta device.")
    w32, r, s = w.float(), module.r, module.scaling  # (out, in)
    if family == "olora":
        Q, R = torch.linalg.qr(w32)  # (out, k), (k, in)
        B, A = Q[:, :r], R[:r]
    else:
        fast = _PISSA_FAST.fullmatch(init)
        if fast:
            U, S, V = torch.svd_lowrank(w32, r, niter=int(fast.group(1)))
            Vh = V.T
        else:
            U, S, Vh = torch.linalg.svd(w32, full_matrices=False)
        root = torch.sqrt(S[:r] / s)
        B, A = U[:, :r] * root, root.unsqueeze(1) * Vh[:r]  # (out, r), (r, in)
    dtype = module.lora_A.dtype
    module.lora_A.copy_(A.to(dtype))
    module.lora_B.copy_(B.to(dtype))
    module._set_weight(w32 - s * (module.lora_B.float() @ module.lora_A.float()))
    module.init = family
    # Off the optimizer and out of state_dict: needed only to convert the adapter at save time.
    module.register_buffer("initial_A", module.lora_A.detach().float().clone(), persistent=False)
    module.register_buffer("initial_B", module.lora_B.detach().float().clone(), persistent=False)


def converted_lora(module: LoRALinear | LoRAEmbedding) -> tuple[Tensor, Tensor]:
    """``(A', B')`` of the plain LoRA that applies ``module``'s training to the original base.

    For PiSSA/OLoRA (PEFT's ``LoraModel.subtract_mutated_init``): ``W + dW = W_res + s B A`` and
    ``W = W_res + s B0 A0``, so ``dW = s (B A - B0 A0) = s [B | -B0] [A ; A0]``: rank ``2r`` at the
    same scaling (PEFT doubles ``r`` and ``lora_alpha``). Other layers: ``(A, B)`` unchanged.

    Returns:
        ``A' (r', in)`` and ``B' (out, r')``, detached.
    """
    A, B = module.lora_A.detach(), module.lora_B.detach()
    if module.init not in BASE_CHANGING:
        return A, B
    A0, B0 = module.initial_A.to(A.dtype), module.initial_B.to(B.dtype)
    return torch.cat([A, A0], dim=0), torch.cat([B, -B0], dim=1)

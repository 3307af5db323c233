"""The LoRA layers: a frozen base module plus a trainable low-rank update (Hu et al. 2021).

:class:`LoRALinear` wraps an ``nn.Linear`` (for plain LoRA also a bitsandbytes 4/8-bit one, a
subclass) or transformers' ``Conv1D`` (GPT-2, weight stored ``(in, out)``: PEFT's
``fan_in_fan_out``), optionally with DoRA (Liu et al. 2024). :class:`LoRAEmbedding` wraps an
``nn.Embedding``. Both keep PEFT's shapes: ``lora_A (r, in)``, ``lora_B (out, r)``, so the update is
always ``B @ A * scaling``, shape ``(out, in)``; PEFT's file keys (``lora_embedding_A``,
``lora_magnitude_vector``) are :mod:`lorafit.adapters`' business. Merging is an explicit call and
exact in float32.
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def is_conv1d(module: nn.Module) -> bool:
    """transformers' ``Conv1D`` (GPT-2 family): a linear map whose weight is ``(in, out)``."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def is_quantized(module: nn.Module) -> bool:
    """A bitsandbytes 4-bit or 8-bit Linear (its weight is packed integers, not floats)."""
    return type(module).__name__ in ("Linear4bit", "Linear8bitLt")


def adapter_dtype(base_dtype: torch.dtype) -> torch.dtype:
    """The dtype of LoRA weights on a base stored in `base_dtype`: float32, or float64 on a
    float64 base. A bfloat16/float16 base (`model.dtype`) or a quantized one keeps its adapter,
    gradients and optimizer state in float32, as PEFT's `autocast_adapter_dtype=True`; the
    forward pass casts A and B to the activations' dtype."""
    return torch.float64 if base_dtype == torch.float64 else torch.float32


def dense_weight(module: nn.Module) -> Tensor:
    """The base weight as ``(out, in)``: a view of the parameter (Conv1D's transposed).

    Raises:
        ValueError: The layer is quantized (its CPU kernels repack the weight on first use).
    """
    if is_quantized(module):
        raise ValueError(
            f"{type(module).__name__} is quantized (model.quantization): its weight is not a "
            "float matrix here; load the base with model.quantization=null for this."
        )
    return module.weight.T if is_conv1d(module) else module.weight


class LoRALinear(nn.Module):
    """A frozen linear layer (``base_layer``) plus the low-rank path ``B @ A``.

    ``y = W x + b + (B A x) * scaling``; with DoRA (``use_dora``, Liu et al. 2024, as PEFT's
    ``DoraLinearLayer``): ``y = m / ||W + s B A||_row * (W x + s B A x) + b`` where the norm is over
    each output row of the ``(out, in)`` weight and is detached from the graph (the paper's §4.3),
    and the magnitude ``m`` (``lora_magnitude_vector``, shape ``(out,)``) starts at that norm.

    Args:
        base_layer: ``nn.Linear`` (bitsandbytes' included) or transformers' ``Conv1D``, kept as is
            (PEFT's attribute name, so state-dict keys read ``...q_proj.base_layer.weight``).
        r: Rank of the update, >= 1.
        lora_alpha: Numerator of the scaling.
        lora_dropout: Dropout probability on the input of the LoRA path only.
        use_rslora: Scale by ``lora_alpha / sqrt(r)`` (rank-stabilised LoRA, Kalajdzievski 2023, as
            PEFT's ``use_rslora``) instead of ``lora_alpha / r``.
        use_dora: Weight-decomposed LoRA (PEFT's ``use_dora``).
    """

    def __init__(
        self,
        base_layer: nn.Module,
        r: int,
        lora_alpha: float,
        lora_dropout: float = 0.0,
        use_rslora: bool = False,
        use_dora: bool = False,
    ) -> None:
        super().__init__()
        if use_dora and is_quantized(base_layer):
            raise ValueError(
                "lora.use_dora=true with model.quantization: lorafit's DoRA needs the float base "
                "weight for its row norms; set model.quantization=null or lora.use_dora=false."
            )
        self.base_layer = base_layer
        self.fan_in_fan_out = is_conv1d(base_layer)  # PEFT's name: weight stored (in, out)
        if self.fan_in_fan_out:
            self.in_features, self.out_features = base_layer.weight.shape
        else:
            self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.r = r
        self.lora_alpha = lora_alpha
        self.use_rslora = use_rslora
        self.use_dora = use_dora
        self.scaling = lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r
        w = base_layer.weight
        kw = {"device": w.device, "dtype": adapter_dtype(w.dtype)}
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, **kw))
        self.lora_B = nn.Parameter(torch.empty(self.out_features, r, **kw))
        self.lora_dropout = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        self.merged = False
        self.disabled = False
        self.init = "default"  # lorafit.lora.init sets pissa/olora and keeps initial_A/B
        self.reset_lora_parameters()
        if use_dora:
            self.lora_magnitude_vector = nn.Parameter(torch.empty(self.out_features, **kw))
            self.reset_magnitude()

    def reset_lora_parameters(self) -> None:
        """A Kaiming-uniform as loralib/PEFT, B zeros: the layer starts equal to its base."""
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    @torch.no_grad()
    def reset_magnitude(self) -> None:
        """DoRA: set the magnitude to the row norms of ``W + s B A`` (the layer equals its LoRA)."""
        if not self.lora_A.is_meta:
            self.lora_magnitude_vector.copy_(self.weight_norm())

    def weight(self) -> Tensor:
        """The base weight as ``(out, in)``, a view (see :func:`dense_weight`)."""
        return dense_weight(self.base_layer)

    @torch.no_grad()
    def weight_norm(self, delta: Tensor | None = None) -> Tensor:
        """``||W + delta||`` over each output row, float32 ``(out,)``; ``delta`` defaults to this
        layer's update. Computed once per call, without gradient (DoRA treats it as a constant)."""
        delta = self.delta_weight() if delta is None else delta
        return torch.linalg.vector_norm(self.weight().float() + delta, dim=1)

    def forward(self, x: Tensor) -> Tensor:
        """Apply the base layer and, unless merged or disabled, the LoRA (or DoRA) path.

        Args:
            x: Input of shape ``(..., in_features)``.

        Returns:
            Tensor of shape ``(..., out_features)``.
        """
        out = self.base_layer(x)
        if self.merged:
            return out
        if self.disabled:
            return out + self._initial_path(x)  # PiSSA/OLoRA: base = residual + initial B0 A0
        # Cast A and B to the input's dtype so float32 adapters work on bf16 activations.
        lora_A, lora_B = self.lora_A.to(x.dtype), self.lora_B.to(x.dtype)
        dropped = self.lora_dropout(x)
        lora = F.linear(F.linear(dropped, lora_A), lora_B) * self.scaling  # (..., out)
        if not self.use_dora:
            return out + lora
        # DoRA as PEFT: add (m/n - 1) W x + (m/n) s B A x to the base output, bias left alone.
        scale = (self.lora_magnitude_vector / self.weight_norm()).to(x.dtype)  # (out,)
        if isinstance(self.lora_dropout, nn.Identity) or not self.training:
            bias = getattr(self.base_layer, "bias", None)
            base = out if bias is None else out - bias
        else:  # PEFT: with dropout on, the base term sees the dropped input too
            base = F.linear(dropped, self.weight().to(x.dtype))
        return out + (scale - 1) * base + scale * lora

    def _initial_path(self, x: Tensor) -> Tensor | float:
        if self.init in ("pissa", "olora"):
            A0, B0 = self.initial_A.to(x.dtype), self.initial_B.to(x.dtype)
            return F.linear(F.linear(x, A0), B0) * self.scaling
        return 0.0

    def delta_weight(self) -> Tensor:
        """Return ``B @ A * scaling`` in float32, shape ``(out_features, in_features)``."""
        return (self.lora_B.float() @ self.lora_A.float()) * self.scaling

    def merged_weight(self) -> Tensor:
        """The float32 ``(out, in)`` weight that computes this layer's output in one matmul."""
        delta = self.delta_weight()
        w = self.weight().float() + delta
        if self.use_dora:
            w = w * (self.lora_magnitude_vector.float() / self.weight_norm(delta)).unsqueeze(1)
        return w

    @torch.no_grad()
    def merge(self) -> None:
        """Write the update into ``base_layer.weight`` (in float32, cast back); warn if merged.

        Raises:
            ValueError: The base is quantized (merge into a float copy, as ``lorafit merge`` does).
        """
        if self.merged:
            warnings.warn("LoRALinear.merge(): already merged; nothing done", stacklevel=2)
            return
        if self.use_dora:  # kept: unmerging needs the norm of the unmerged weight
            self._merge_norm = self.weight_norm()
        self._set_weight(self.merged_weight())
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Take the update back out of ``base_layer.weight``; warn if not merged."""
        if not self.merged:
            warnings.warn("LoRALinear.unmerge(): not merged; nothing done", stacklevel=2)
            return
        w = self.weight().float()
        if self.use_dora:  # PEFT's unmerge: W = W' / (m / n) - delta
            w = w / (self.lora_magnitude_vector.float() / self._merge_norm).unsqueeze(1)
        self._set_weight(w - self.delta_weight())
        self.merged = False

    def _set_weight(self, w: Tensor) -> None:
        """Copy a float32 ``(out, in)`` weight into the base layer's own layout and dtype."""
        dst = self.base_layer.weight
        dst.copy_((w.T if self.fan_in_fan_out else w).to(dst.dtype))

    def extra_repr(self) -> str:
        dora = ", use_dora=True" if self.use_dora else ""
        return f"r={self.r}, lora_alpha={self.lora_alpha}, scaling={self.scaling:g}{dora}"


class LoRAEmbedding(nn.Module):
    """A frozen ``nn.Embedding`` plus a low-rank update of its table (PEFT's ``lora.Embedding``).

    ``lora_A (r, num_embeddings)`` and ``lora_B (embedding_dim, r)`` (PEFT's ``lora_embedding_A``
    / ``lora_embedding_B``); the table changes by ``(B @ A).T * scaling``, shape
    ``(num_embeddings, embedding_dim)``. As loralib and PEFT: A starts at zeros and B normal, and
    no dropout (PEFT's embedding layer does not apply it).

    Args:
        base_layer: The embedding to adapt.
        r, lora_alpha, use_rslora: As :class:`LoRALinear`.
        lora_dropout: Accepted for a uniform signature; unused, as in PEFT.
    """

    use_dora = False
    fan_in_fan_out = False
    init = "default"

    def __init__(
        self,
        base_layer: nn.Embedding,
        r: int,
        lora_alpha: float,
        lora_dropout: float = 0.0,
        use_rslora: bool = False,
    ) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.in_features, self.out_features = base_layer.num_embeddings, base_layer.embedding_dim
        self.r = r
        self.lora_alpha = lora_alpha
        self.use_rslora = use_rslora
        self.scaling = lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r
        w = base_layer.weight
        kw = {"device": w.device, "dtype": adapter_dtype(w.dtype)}
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, **kw))
        self.lora_B = nn.Parameter(torch.empty(self.out_features, r, **kw))
        self.merged = False
        self.disabled = False
        self.reset_lora_parameters()

    def reset_lora_parameters(self) -> None:
        """A zeros, B standard normal (loralib's ``Embedding``; PEFT's)."""
        nn.init.zeros_(self.lora_A)
        nn.init.normal_(self.lora_B)

    def forward(self, x: Tensor) -> Tensor:
        """Look up ``x`` (token ids, any shape) -> ``(..., embedding_dim)``."""
        out = self.base_layer(x)
        if self.merged or self.disabled:
            return out
        b = self.base_layer
        after_A = F.embedding(  # rows of A.T: (..., r), with the base's lookup options
            x, self.lora_A.T, b.padding_idx, b.max_norm, b.norm_type, b.scale_grad_by_freq, b.sparse
        )
        return out + ((after_A @ self.lora_B.T) * self.scaling).to(out.dtype)

    def delta_weight(self) -> Tensor:
        """Return ``B @ A * scaling`` in float32, shape ``(embedding_dim, num_embeddings)``."""
        return (self.lora_B.float() @ self.lora_A.float()) * self.scaling

    def weight(self) -> Tensor:
        """The table as ``(embedding_dim, num_embeddings)``, LoRA's ``(out, in)`` convention."""
        return self.base_layer.weight.T

    @torch.no_grad()
    def merge(self) -> None:
        """Add the update into the embedding table (in float32, cast back); warn if merged."""
        if self.merged:
            warnings.warn("LoRAEmbedding.merge(): already merged; nothing done", stacklevel=2)
            return
        w = self.base_layer.weight
        w.copy_((w.float() + self.delta_weight().T).to(w.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract the update from the embedding table; warn if not merged."""
        if not self.merged:
            warnings.warn("LoRAEmbedding.unmerge(): not merged; nothing done", stacklevel=2)
            return
        w = self.base_layer.weight
        w.copy_((w.float() - self.delta_weight().T).to(w.dtype))
        self.merged = False

    def extra_repr(self) -> str:
        return f"r={self.r}, lora_alpha={self.lora_alpha}, scaling={self.scaling:g}"


LORA_LAYERS = (LoRALinear, LoRAEmbedding)


def make_lora_layer(
    base: nn.Module,
    r: int,
    lora_alpha: float,
    lora_dropout: float = 0.0,
    use_rslora: bool = False,
    use_dora: bool = False,
) -> LoRALinear | LoRAEmbedding:
    """The LoRA layer for ``base``: :class:`LoRAEmbedding` for an embedding, else
    :class:`LoRALinear`.

    Raises:
        ValueError: DoRA on an embedding (lorafit implements DoRA for linear layers only).
    """
    if isinstance(base, nn.Embedding):
        if use_dora:
            raise ValueError(
                "lora.use_dora=true with an nn.Embedding among lora.target_modules: lorafit's DoRA "
                "covers linear layers only; leave the embedding out or set lora.use_dora=false."
            )
        return LoRAEmbedding(base, r, lora_alpha, lora_dropout, use_rslora)
    return LoRALinear(base, r, lora_alpha, lora_dropout, use_rslora, use_dora)

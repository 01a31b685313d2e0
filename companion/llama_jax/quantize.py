"""Weight-only quantization: projections (and optionally the embedding) stored as small integers plus scales.

``quantize(model, bits=8)`` swaps each targeted ``nnx.Linear`` for a ``QuantizedLinear`` at the same attribute,
so module paths keep Hugging Face's names (``model.layers.0.self_attn.q_proj``), as LoRA does. The weights
are stored as in Hugging Face and GGUF, one row per output, cut into groups of ``group_size`` inputs
(``None``: one group per row, "per channel"); each group has a float scale and, for int4, a minimum:

    int8, symmetric:   w ~= scale * q,           q in [-127, 127], scale = absmax / 127
    int4, asymmetric:  w ~= scale * q + offset,  q in [0, 15],     scale = (max - min) / 15, offset = min

The int4 layout is GGUF's Q4_1 block (32 weights, a scale and a minimum), so ``from_gguf(...,
keep_quantized=True)`` fills the same module from a file's blocks without a float copy. The values live
in ``QuantizedWeight`` variables, not ``nnx.Param``: optimizers and gradients (``wrt=nnx.LoRAParam``)
never see them, and LoRA adapters train on top of a quantized base (QLoRA).

Written here rather than taken from a library (qwix): no extra dependency, a group layout that matches
GGUF's blocks exactly, and forty lines the book can show in full. int4 values are held one per int8 (XLA's
CPU backend converts ``jnp.int4`` far slower than int8), so int4 in groups takes more memory than int8 per
channel (a byte per value, plus a scale and a minimum per group): it is here for GGUF's 4-bit blocks.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from .model import LlamaForCausalLM

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
BITS = (4, 8)
# At most this many rows (batch x new tokens) multiply the integers directly, row by row; more rows
# (a prompt) dequantize the weight once and use one matmul. (Batch-8 decode on SmolLM2 int8: 72 ms a step
# multiplying directly, 87 ms dequantizing.)
_DIRECT_ROWS = 8


class QuantizationError(ValueError):
    """Settings that cannot quantize this model, or a tensor type that cannot be kept quantized."""


class QuantizedWeight(nnx.Variable):
    """Integer values, scales and offsets of a quantized weight: not an ``nnx.Param``, so never trained."""


def quantize_rows(w: jax.Array, bits: int, group_size: int | None, scale_dtype=jnp.float32):
    """A float matrix (out, in) -> (q int8 (out, in), scale (out, groups), offset (out, groups) or None)."""
    out_features, in_features = w.shape
    size = in_features if group_size is None else group_size
    groups = w.astype(jnp.float32).reshape(out_features, in_features // size, size)
    if bits == 8:
        scale = jnp.max(jnp.abs(groups), axis=-1) / 127
        safe = jnp.where(scale == 0, 1, scale)
        q = jnp.clip(jnp.round(groups / safe[..., None]), -127, 127)
        offset = None
    else:
        low, high = jnp.min(groups, axis=-1), jnp.max(groups, axis=-1)
        scale = (high - low) / 15
        safe = jnp.where(scale == 0, 1, scale)
        q = jnp.clip(jnp.round((groups - low[..., None]) / safe[..., None]), 0, 15)
        offset = low.astype(scale_dtype)
    return q.reshape(out_features, in_features).astype(jnp.int8), scale.astype(scale_dtype), offset


def dequantize_rows(q, scale, offset, dtype) -> jax.Array:
    """(out, in) integers with (out, groups) scales (and offsets) -> the float matrix (out, in) in ``dtype``."""
    out_features, in_features = q.shape
    groups = q.reshape(out_features, scale.shape[1], -1).astype(jnp.float32) * scale[..., None]
    if offset is not None:
        groups = groups + offset[..., None].astype(jnp.float32)
    return groups.reshape(out_features, in_features).astype(dtype)


def matmul_rows(x: jax.Array, q, scale, offset, dtype) -> jax.Array:
    """x [..., in] times the quantized (out, in) matrix transposed -> [..., out] in ``dtype``.

    A few rows (decoding) multiply and sum against the integers in one fused pass over the int8 weight,
    with no float copy of it: per channel, the scale (and offset) apply once per output after the sum;
    in groups, each weight is dequantized inside the same pass. More rows (a prompt) dequantize the
    weight once and use a single matmul."""
    out_features, in_features = q.shape
    lead = x.shape[:-1]
    rows = 1
    for n in lead:
        rows *= n
    if rows > _DIRECT_ROWS:
        return jnp.einsum("...i,oi->...o", x.astype(dtype), dequantize_rows(q, scale, offset, dtype))
    xs = x.reshape(rows, 1, in_features).astype(jnp.float32)
    if scale.shape[1] == 1:  # per channel: sum_i (s q_i + m) x_i = s (q . x) + m sum_i x_i
        # q[None], not q: the explicit leading axis makes XLA's CPU backend emit a faster fused loop
        # (SmolLM2 int8 decode step 43 ms against 67 ms with plain broadcasting)
        y = jnp.sum(q[None].astype(jnp.float32) * xs, axis=-1)  # [rows, out]
        y = y * scale[:, 0].astype(jnp.float32)
        if offset is not None:
            y = y + jnp.sum(xs, axis=-1) * offset[:, 0].astype(jnp.float32)
    else:
        y = jnp.sum(dequantize_rows(q, scale, offset, jnp.float32)[None] * xs, axis=-1)
    return y.reshape(*lead, out_features).astype(dtype)


class QuantizedLinear(nnx.Module):
    """A bias-free projection whose weight (out, in) is held quantized; called like the ``nnx.Linear`` it
    replaces: x [..., in] -> [..., out] in ``dtype``."""

    DENSE = "kernel"  # the dense module's parameter name (what merge_lora and dequantize() fill)

    def __init__(self, qvalue, scale, offset=None, *, bits: int, dtype=jnp.float32):
        self.out_features, self.in_features = qvalue.shape
        self.bits, self.group_size = bits, self.in_features // scale.shape[1]
        self.dtype = jnp.dtype(dtype)
        self.qvalue = QuantizedWeight(qvalue)  # (out, in) int8
        self.scale = QuantizedWeight(scale)  # (out, groups)
        self.offset = None if offset is None else QuantizedWeight(offset)  # (out, groups): the minimum

    def _parts(self):
        offset = None if self.offset is None else self.offset[...]
        return self.qvalue[...], self.scale[...], offset

    def dequantize(self, dtype=None) -> jax.Array:
        """The dense kernel, (in, out) as ``nnx.Linear`` holds it."""
        return dequantize_rows(*self._parts(), dtype or self.dtype).T

    def __call__(self, x: jax.Array) -> jax.Array:
        return matmul_rows(x, *self._parts(), self.dtype)


class QuantizedEmbed(nnx.Module):
    """The token embedding (V, H) held quantized: ``__call__`` looks rows up and dequantizes them;
    ``attend`` is the tied head, hidden [..., H] -> logits [..., V], as ``nnx.Embed.attend``."""

    DENSE = "embedding"

    def __init__(self, qvalue, scale, offset=None, *, bits: int, dtype=jnp.float32):
        self.num_embeddings, self.features = qvalue.shape
        self.bits, self.group_size = bits, self.features // scale.shape[1]
        self.dtype = jnp.dtype(dtype)
        self.qvalue = QuantizedWeight(qvalue)  # (V, H) int8
        self.scale = QuantizedWeight(scale)  # (V, groups)
        self.offset = None if offset is None else QuantizedWeight(offset)

    def _parts(self):
        offset = None if self.offset is None else self.offset[...]
        return self.qvalue[...], self.scale[...], offset

    def dequantize(self, dtype=None) -> jax.Array:
        """The dense embedding (V, H)."""
        return dequantize_rows(*self._parts(), dtype or self.dtype)

    def __call__(self, input_ids: jax.Array) -> jax.Array:
        q, scale, offset = self._parts()
        ids = input_ids.reshape(-1)
        rows = dequantize_rows(q[ids], scale[ids], None if offset is None else offset[ids], self.dtype)
        return rows.reshape(*input_ids.shape, self.features)

    def attend(self, query: jax.Array) -> jax.Array:
        return matmul_rows(query, *self._parts(), self.dtype)


def _check(bits: int, group_size: int | None, name: str, in_features: int) -> None:
    if bits not in BITS:
        raise QuantizationError(f"bits={bits} is not supported; use one of {list(BITS)}")
    if group_size is None:
        if bits == 4:
            raise QuantizationError("int4 needs groups: pass group_size (32, 64 or 128, as GGUF's 32)")
        return
    if group_size < 1 or in_features % group_size:
        raise QuantizationError(
            f"group_size={group_size} does not divide {name}'s input dimension ({in_features})"
        )


def projections(model: LlamaForCausalLM, targets: Sequence[str] = TARGETS):
    """(Hugging Face module name, parent module, attribute) of each targeted projection of every layer."""
    for i, layer in enumerate(model.model.layers):
        for group in ("self_attn", "mlp"):
            parent = getattr(layer, group)
            for name in TARGETS:
                if name in targets and hasattr(parent, name):
                    yield f"model.layers.{i}.{group}.{name}", parent, name


def quantize(
    model: LlamaForCausalLM,
    bits: int = 8,
    group_size: int | None = None,
    targets: Sequence[str] = TARGETS,
    embeddings: bool = False,
    scale_dtype=jnp.float32,
) -> LlamaForCausalLM:
    """Quantize the projections named in ``targets`` (and the embedding, if ``embeddings``), in place;
    returns the model. int8 is symmetric, per output channel (``group_size=None``) or in groups; int4 is
    asymmetric (a scale and a minimum per group) and needs a ``group_size``. Computations stay in the
    model's dtype; the float weights are dropped."""
    if bits not in BITS:
        raise QuantizationError(f"bits={bits} is not supported; use one of {list(BITS)}")
    if unknown := sorted(set(targets) - set(TARGETS)):
        raise QuantizationError(f"targets {unknown} match no layer; the projections are {list(TARGETS)}")
    found = list(projections(model, targets))
    for name, parent, attribute in found:  # every check before any change
        module = getattr(parent, attribute)
        if not isinstance(module, (nnx.Linear, QuantizedLinear)):
            raise QuantizationError(f"{name} is a {type(module).__name__}: quantize before add_lora")
        _check(bits, group_size, name, module.in_features)
    embed = model.model.embed_tokens
    if embeddings and isinstance(embed, nnx.Embed):
        _check(bits, group_size, "model.embed_tokens", embed.features)
    for _, parent, attribute in found:
        module = getattr(parent, attribute)
        if isinstance(module, QuantizedLinear):
            continue
        kernel = module.kernel.get_value()
        q, scale, offset = quantize_rows(kernel.T, bits, group_size, scale_dtype)
        dtype = module.dtype or kernel.dtype
        setattr(parent, attribute, QuantizedLinear(q, scale, offset, bits=bits, dtype=dtype))
    if embeddings and isinstance(embed, nnx.Embed):
        table = embed.embedding.get_value()
        q, scale, offset = quantize_rows(table, bits, group_size, scale_dtype)
        model.model.embed_tokens = QuantizedEmbed(
            q, scale, offset, bits=bits, dtype=embed.dtype or table.dtype
        )
    return model


def is_quantized(model) -> bool:
    """Whether the model holds any quantized weight."""
    return bool(nnx.to_flat_state(nnx.state(model, QuantizedWeight)))


def set_module(model, name: str, module: nnx.Module) -> None:
    """Put ``module`` at the Hugging Face module name ``name`` ('model.layers.0.self_attn.q_proj')."""
    *steps, last = name.split(".")
    parent = model
    for step in steps:
        parent = parent[int(step)] if step.isdigit() else getattr(parent, step)
    setattr(parent, last, module)

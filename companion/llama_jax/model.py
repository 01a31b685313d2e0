"""Llama 3.x as Flax NNX modules, named like transformers' ``modeling_llama.py`` so the two read side by side.

Shapes in comments: B batch, T new tokens, S key/value slots (T without a cache, the cache length
with one), H hidden size, N query heads, K key/value heads, G = N // K query heads per key/value
head, D head_dim, V vocabulary.

Linear kernels are stored (in, out), as Flax does; Hugging Face stores (out, in). ``weights.py``
transposes when loading.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from .config import LlamaConfig
from .rope import apply_rope, inverse_frequencies, rope_angles


class RMSNorm(nnx.Module):
    """x / sqrt(mean(x^2) + eps) * weight, with the statistics in float32 (as transformers does)."""

    def __init__(self, dim: int, eps: float, *, dtype=jnp.float32):
        self.eps = eps
        self.weight = nnx.Param(jnp.ones((dim,), dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.weight[...] * normed.astype(x.dtype)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
    """Keys and values of every layer, preallocated: each [B, K, S, D] for S = the cache length.

    Heads come before slots (as in transformers' cache), so attention over the cache is a plain
    batched matmul over (batch, head) with no transposed copy of the cache at every decode step."""

    keys: list[jax.Array]
    values: list[jax.Array]

    @classmethod
    def zeros(cls, config: LlamaConfig, batch: int, length: int, dtype) -> KVCache:
        shape = (batch, config.num_key_value_heads, length, config.head_dim)
        layers = range(config.num_hidden_layers)
        return cls([jnp.zeros(shape, dtype) for _ in layers], [jnp.zeros(shape, dtype) for _ in layers])


def attention_mask_for(kv_mask: jax.Array, start, num_queries: int) -> jax.Array:
    """Which key slots each query may attend to: [B, T, S] bool.

    Query i sits in slot ``start + i``. It sees slot j when j holds a real token (``kv_mask`` [B, S],
    False for left padding and empty cache slots) and j <= start + i (the causal mask).
    """
    query_slots = start + jnp.arange(num_queries)[:, None]  # [T, 1]
    key_slots = jnp.arange(kv_mask.shape[1])[None, :]  # [1, S]
    causal = key_slots <= query_slots  # [T, S]
    return causal[None, :, :] & kv_mask[:, None, :].astype(bool)


def positions_for(kv_mask: jax.Array, start, num_queries: int) -> jax.Array:
    """RoPE positions of the new tokens, [B, T]: each row counts from its own first real token,
    so a left-padded prompt gets the same positions as the same prompt alone."""
    counts = jnp.cumsum(kv_mask.astype(jnp.int32), axis=1) - 1  # [B, S]
    return jnp.maximum(jax.lax.dynamic_slice_in_dim(counts, start, num_queries, axis=1), 0)


class LlamaAttention(nnx.Module):
    """Grouped-query attention: N query heads share K key/value heads, G = N // K each, never copied."""

    def __init__(self, config: LlamaConfig, *, dtype, rngs: nnx.Rngs):
        hidden, d = config.hidden_size, config.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = (
            config.num_attention_heads,
            config.num_key_value_heads,
            d,
        )
        linear = lambda i, o: nnx.Linear(i, o, use_bias=False, dtype=dtype, param_dtype=dtype, rngs=rngs)
        self.q_proj = linear(hidden, self.num_heads * d)
        self.k_proj = linear(hidden, self.num_kv_heads * d)
        self.v_proj = linear(hidden, self.num_kv_heads * d)
        self.o_proj = linear(self.num_heads * d, hidden)

    def __call__(self, x, cos, sin, mask, cache=None, start=0):
        """x [B, T, H], cos/sin [B, T, D/2], mask [B, T, S]; cache: this layer's (keys, values) or None.

        Returns the output [B, T, H] and the updated (keys, values) [B, K, S, D] (or None).
        """
        b, t, _ = x.shape
        k_heads, groups, d = self.num_kv_heads, self.num_heads // self.num_kv_heads, self.head_dim
        q = apply_rope(self.q_proj(x).reshape(b, t, self.num_heads, d), cos, sin)
        k = apply_rope(self.k_proj(x).reshape(b, t, k_heads, d), cos, sin).transpose(0, 2, 1, 3)
        v = self.v_proj(x).reshape(b, t, k_heads, d).transpose(0, 2, 1, 3)
        if cache is not None:  # write the new keys/values into their slots, attend to the whole cache
            cached_k, cached_v = cache
            k = jax.lax.dynamic_update_slice_in_dim(cached_k, k.astype(cached_k.dtype), start, axis=2)
            v = jax.lax.dynamic_update_slice_in_dim(cached_v, v.astype(cached_v.dtype), start, axis=2)
            cache = (k, v)
        q = q.reshape(b, t, k_heads, groups, d)  # query head n = k * G + g, as in transformers' repeat_kv
        scores = jnp.einsum("btkgd,bksd->bkgts", q, k, preferred_element_type=jnp.float32) / jnp.sqrt(d)
        scores = jnp.where(mask[:, None, None, :, :], scores, jnp.finfo(jnp.float32).min)
        weights = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
        out = jnp.einsum("bkgts,bksd->bkgtd", weights, v)  # (b, k, g) lead: a plain batched matmul
        out = out.transpose(0, 3, 1, 2, 4).reshape(b, t, self.num_heads * d)  # -> [B, T, N * D]
        return self.o_proj(out), cache


class LlamaMLP(nnx.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: LlamaConfig, *, dtype, rngs: nnx.Rngs):
        linear = lambda i, o: nnx.Linear(i, o, use_bias=False, dtype=dtype, param_dtype=dtype, rngs=rngs)
        self.gate_proj = linear(config.hidden_size, config.intermediate_size)
        self.up_proj = linear(config.hidden_size, config.intermediate_size)
        self.down_proj = linear(config.intermediate_size, config.hidden_size)

    def __call__(self, x):
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaDecoderLayer(nnx.Module):
    """Pre-norm residual block: x + attention(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: LlamaConfig, *, dtype, rngs: nnx.Rngs):
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype=dtype)
        self.self_attn = LlamaAttention(config, dtype=dtype, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype=dtype)
        self.mlp = LlamaMLP(config, dtype=dtype, rngs=rngs)

    def __call__(self, x, cos, sin, mask, cache=None, start=0):
        attn_out, cache = self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, start)
        x = x + attn_out
        return x + self.mlp(self.post_attention_layernorm(x)), cache


@nnx.remat
def _recomputed_layer(layer: LlamaDecoderLayer, x, cos, sin, mask):
    """A decoder layer whose activations are recomputed in the backward pass (``nnx.remat``)."""
    return layer(x, cos, sin, mask)


class LlamaModel(nnx.Module):
    """Embedding, the decoder layers and the final norm: token ids [B, T] -> hidden states [B, T, H]."""

    def __init__(self, config: LlamaConfig, *, dtype, rngs: nnx.Rngs):
        self.config = config
        self.embed_tokens = nnx.Embed(
            config.vocab_size, config.hidden_size, dtype=dtype, param_dtype=dtype, rngs=rngs
        )
        self.layers = nnx.List(
            [LlamaDecoderLayer(config, dtype=dtype, rngs=rngs) for _ in range(config.num_hidden_layers)]
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype=dtype)
        # transformers' gradient checkpointing: keep only each layer's input for the backward pass and
        # recompute the rest of the layer there (less memory, one more forward); off for inference
        self.gradient_checkpointing = False

    def __call__(self, input_ids, kv_mask, cache: KVCache | None = None, start=0):
        t = input_ids.shape[1]
        cos, sin = rope_angles(positions_for(kv_mask, start, t), inverse_frequencies(self.config))
        mask = attention_mask_for(kv_mask, start, t)
        x = self.embed_tokens(input_ids)
        new_keys, new_values = [], []
        for i, layer in enumerate(self.layers):
            layer_cache = None if cache is None else (cache.keys[i], cache.values[i])
            if self.gradient_checkpointing and cache is None:
                x, layer_cache = _recomputed_layer(layer, x, cos, sin, mask)
            else:
                x, layer_cache = layer(x, cos, sin, mask, layer_cache, start)
            if layer_cache is not None:
                new_keys.append(layer_cache[0])
                new_values.append(layer_cache[1])
        return self.norm(x), (None if cache is None else KVCache(new_keys, new_values))


class LlamaForCausalLM(nnx.Module):
    """The full model: token ids [B, T] -> logits [B, T, V].

    ``model(input_ids)`` runs a whole sequence; ``attention_mask`` [B, T] (1 for real tokens, 0 for
    left padding) lets prompts of different lengths share a batch. With a ``cache`` (see
    ``generate.py``) ``attention_mask`` covers every cache slot [B, S], the new tokens go to slots
    ``start .. start + T - 1``, and the call returns ``(logits, cache)``.
    """

    def __init__(self, config: LlamaConfig, *, dtype=jnp.float32, rngs: nnx.Rngs | None = None):
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        self.config = config
        self.model = LlamaModel(config, dtype=dtype, rngs=rngs)
        if not config.tie_word_embeddings:
            self.lm_head = nnx.Linear(
                config.hidden_size,
                config.vocab_size,
                use_bias=False,
                dtype=dtype,
                param_dtype=dtype,
                rngs=rngs,
            )

    def logits(self, hidden: jax.Array) -> jax.Array:
        """Hidden states [..., H] -> logits [..., V], float32; a tied head reuses the embedding matrix."""
        if self.config.tie_word_embeddings:
            embed = self.model.embed_tokens
            if isinstance(embed, nnx.Embed):  # hidden [..., H] . embedding [V, H] over H, as embed.attend;
                # written as an einsum: attend's `hidden @ embedding.T` makes XLA's CPU backend copy the
                # transposed table at every call, which was 38% of a batch-1 decode step on SmolLM2
                out = jnp.einsum("...h,vh->...v", hidden, embed.embedding[...])
            else:  # a quantized embedding (quantize.py) brings its own product
                out = embed.attend(hidden)
        else:
            out = self.lm_head(hidden)
        return out.astype(jnp.float32)

    def __call__(self, input_ids, attention_mask=None, *, cache: KVCache | None = None, start=0):
        if attention_mask is None:
            slots = input_ids.shape[1] if cache is None else cache.keys[0].shape[2]
            attention_mask = jnp.ones((input_ids.shape[0], slots), bool)
        hidden, cache = self.model(input_ids, attention_mask, cache, start)
        logits = self.logits(hidden)
        return logits if cache is None else (logits, cache)

"""Text generation: a jitted prefill and a jitted decode loop over a preallocated KV cache.

``generate`` runs two compiled XLA programs: ``_prefill`` writes the whole (left-padded) prompt into
the cache and samples the first new token, then ``_decode`` runs a ``jax.lax.while_loop`` that feeds
each new token back, one cache slot at a time, until every row has hit EOS or the budget is spent.
When streaming, the host calls ``_decode`` for a few steps at a time and hands the tokens on between
calls: no host callback inside the program, so JAX's persistent compilation cache can keep both
(``llama_jax.enable_compilation_cache()``). Host values go in as numpy arrays, and the empty cache and
the random key are made inside the programs: no other program runs, so a new process has nothing else
to compile or load. Shapes are padded to buckets (prompt
length to a power of two from 16, cache length to a multiple of ``CACHE_BUCKET``), so the programs
compile once per (batch, prompt bucket, cache bucket, sampling mode) and are reused by every later call
that falls in the same buckets. ``llama_jax.ChatSession`` calls the same two programs on a cache it
keeps from turn to turn.

``generate_naive`` is the slow loop that rereads everything: one full forward pass per new token.
It is the baseline the book and the benchmark compare against, and the tests check that both give
the same tokens.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from .model import KVCache, LlamaForCausalLM
from .sharding import kv_cache_sharding, mesh_of, split_rows

MIN_PROMPT_BUCKET = 16
CACHE_BUCKET = 128
STREAM_STEPS = 4  # decode steps per compiled call when streaming: the host hands on tokens between calls


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def prompt_bucket(length: int) -> int:
    """The padded length a prompt of ``length`` tokens is prefilled at: a power of two, at least 16, so a
    short prompt pays for few extra positions and the program compiles for few distinct lengths."""
    return max(MIN_PROMPT_BUCKET, 1 << (length - 1).bit_length())


def left_pad(sequences: Sequence[Sequence[int]], pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Token id lists of different lengths -> (ids [B, T], attention_mask [B, T]), padded on the left,
    so that every row's last token sits in the last column and generation appends to all rows at once."""
    if not sequences or any(len(s) == 0 for s in sequences):
        raise ValueError("every prompt needs at least one token")
    width = max(len(s) for s in sequences)
    ids = np.full((len(sequences), width), pad_id, np.int32)
    mask = np.zeros((len(sequences), width), np.int32)
    for row, seq in enumerate(sequences):
        ids[row, width - len(seq) :] = seq
        mask[row, width - len(seq) :] = 1
    return ids, mask


# ----------------------------------------------------------------------------------------- sampling


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How the next token is chosen. Greedy when ``temperature == 0``; otherwise the logits are divided
    by the temperature, cut to the ``top_k`` best and/or the smallest set whose probability reaches
    ``top_p``, and a token is drawn."""

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


def sample_next(logits: jax.Array, key: jax.Array, sampling: Sampling) -> jax.Array:
    """logits [B, V] float32 -> next token ids [B] int32."""
    if sampling.temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / sampling.temperature
    if sampling.top_k is not None:
        kth_best = jax.lax.top_k(logits, sampling.top_k)[0][:, -1:]
        logits = jnp.where(logits < kth_best, -jnp.inf, logits)
    if sampling.top_p is not None and sampling.top_p < 1:
        sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # probability mass of strictly better tokens
        kept = jnp.where(before < sampling.top_p, sorted_logits, jnp.inf)  # always keeps the best
        logits = jnp.where(logits < jnp.min(kept, axis=-1, keepdims=True), -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


# ----------------------------------------------------------------------------- the fast programs


class DecodeState(NamedTuple):
    """What the decode loop carries from one step to the next (a pytree, so the programs take it whole).
    B is the batch, S the cache's slots."""

    cache: KVCache  # keys and values of every layer, [B, kv_heads, S, head_dim] each
    kv_mask: jax.Array  # [B, S] bool: which slots hold a real token
    token: jax.Array  # [B] int32: the last token sampled, fed in at the next step
    done: jax.Array  # [B] bool: the row has produced an end token
    step: jax.Array  # int32 scalar: how many new tokens exist
    slot: jax.Array  # int32 scalar: the cache slot the next token goes to


@functools.partial(jax.jit, static_argnames=("sampling", "mesh"), donate_argnames=("cache",))
def _prefill(model, cache, input_ids, kv_mask, start, seed, eos_ids, *, sampling, mesh):
    """Writes ``input_ids`` [B, T] into cache slots ``start .. start + T - 1`` (``kv_mask`` [B, S] already
    marks the real ones) and samples the first new token. Returns (token [B], done [B], cache).
    ``cache=None`` starts from an empty cache of S slots, made here rather than by a program of its own.

    The model goes in as it is: an NNX module is a pytree (its arrays are the leaves, its structure
    the static part), which ``jax.jit`` flattens far faster than ``nnx.split`` walks the module's
    object graph on every call."""
    if cache is None:
        dtype = model.model.norm.weight[...].dtype  # the model's dtype (its embedding may be quantized)
        cache = KVCache.zeros(model.config, input_ids.shape[0], kv_mask.shape[1], dtype)
        if mesh is not None:
            cache = jax.lax.with_sharding_constraint(cache, kv_cache_sharding(model.config, mesh))
    hidden, cache = model.model(input_ids, kv_mask, cache, start)
    # only the last position's logits are needed
    key = jax.random.key(seed)
    token = sample_next(model.logits(hidden[:, -1]), jax.random.fold_in(key, 0), sampling)
    return _replicated(mesh, token), _replicated(mesh, jnp.isin(token, eos_ids)), cache


@functools.partial(jax.jit, static_argnames=("sampling", "steps", "mesh"), donate_argnames=("state",))
def _decode(model, state: DecodeState, max_new_tokens, seed, eos_ids, pad_id, *, sampling, steps, mesh):
    """Up to ``steps`` decode steps in a ``while_loop``: feed ``state.token`` into cache slot
    ``state.slot``, sample the next one, repeat, until ``max_new_tokens`` tokens exist or every row is
    done; a row that is done gets ``pad_id``. Returns the new tokens [B, steps] (pad past the last step
    run) and the next state."""
    batch = state.token.shape[0]
    key = jax.random.key(seed)

    def keep_going(loop):
        i, s, _ = loop
        return (i < steps) & (s.step < max_new_tokens) & ~jnp.all(s.done)

    def decode_one(loop):
        i, s, out = loop
        kv_mask = jax.lax.dynamic_update_slice_in_dim(s.kv_mask, jnp.ones((batch, 1), bool), s.slot, axis=1)
        hidden, cache = model.model(s.token[:, None], kv_mask, s.cache, s.slot)
        token = sample_next(model.logits(hidden[:, 0]), jax.random.fold_in(key, s.step), sampling)
        token = jnp.where(s.done, pad_id, token)
        done = s.done | jnp.isin(token, eos_ids)
        out = jax.lax.dynamic_update_slice_in_dim(out, token[:, None], i, axis=1)
        return i + 1, DecodeState(cache, kv_mask, token, done, s.step + 1, s.slot + 1), out

    out = jnp.full((batch, steps), pad_id, jnp.int32)
    _, state, out = jax.lax.while_loop(keep_going, decode_one, (jnp.int32(0), state, out))
    token, done, out = (_replicated(mesh, a) for a in (state.token, state.done, out))
    return out, state._replace(token=token, done=done)


def _replicated(mesh: Mesh | None, x: jax.Array) -> jax.Array:
    """On a mesh, every device (and so every process) gets the whole array, so each can read it."""
    return x if mesh is None else jax.lax.with_sharding_constraint(x, NamedSharding(mesh, P()))


def _host(x: jax.Array) -> np.ndarray:
    """A (replicated) result as numpy: this process's first copy is the whole array (copied, as the
    device buffer may be donated to the next call)."""
    return np.array(x.addressable_data(0))


def prefill_and_decode(
    model,
    cache,
    ids,
    kv_mask,
    start,
    max_new_tokens,
    seed,
    eos,
    pad_id,
    *,
    sampling,
    steps,
    mesh,
    callback=None,
    stop=None,
):
    """The two programs in a row, for ``generate`` and ``ChatSession``: ``_prefill`` writes ``ids`` [B, T]
    into cache slots ``start .. start + T - 1`` (``cache=None``: a new, empty cache of ``kv_mask``'s
    S slots) and samples the first token; then the host calls ``_decode`` for ``steps`` steps at a time
    until ``max_new_tokens`` tokens exist, every row is done, or ``stop()`` says so, handing each step's
    tokens [B] to ``callback(step, tokens)`` between calls (streaming). Returns (tokens [B, n], the
    last ``DecodeState``, whose cache holds every new token but the last).

    Host values go in as numpy (``kv_mask`` too: pass a copy if you change yours afterwards):
    ``jnp.asarray`` and ``jax.random.key`` would each be a small program of its own, which a new
    process would have to load."""
    seed = check_seed(seed)
    eos = np.asarray(eos or (-1,), np.int32)
    token, done, cache = _prefill(
        model, cache, ids, kv_mask, np.int32(start), seed, eos, sampling=sampling, mesh=mesh
    )
    state = DecodeState(cache, kv_mask, token, done, np.int32(1), np.int32(start + ids.shape[1]))
    tokens = [_host(state.token)[:, None]]
    if callback is not None:
        callback(0, tokens[0][:, 0])
    step, done = 1, _host(state.done)
    while step < max_new_tokens and not done.all() and not (stop is not None and stop()):
        out, state = _decode(
            model,
            state,
            max_new_tokens,
            seed,
            eos,
            pad_id,
            sampling=sampling,
            steps=steps,
            mesh=mesh,
        )
        ran = int(_host(state.step)) - step
        block = _host(out)[:, :ran]
        for i in range(ran if callback is not None else 0):
            callback(step + i, block[:, i])
        tokens.append(block)
        step, done = step + ran, _host(state.done)
    return np.concatenate(tokens, axis=1), state


def _sampling(sampling: Sampling | None, temperature: float, top_k, top_p) -> Sampling:
    if sampling is None:
        return Sampling(temperature, top_k, top_p)
    if (temperature, top_k, top_p) != (0.0, None, None):
        raise ValueError("pass sampling= or temperature/top_k/top_p, not both")
    return sampling


def _check_inputs(model: LlamaForCausalLM, input_ids, attention_mask, max_new_tokens: int):
    ids = np.asarray(input_ids)
    if ids.ndim == 1:
        ids = ids[None]
    if ids.ndim != 2 or ids.shape[1] == 0:
        raise ValueError(f"input_ids must be [batch, time] with at least one token, got shape {ids.shape}")
    mask = (
        np.ones(ids.shape, np.int32)
        if attention_mask is None
        else np.asarray(attention_mask).reshape(ids.shape)
    )
    if not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"input_ids must be integers, got {ids.dtype}")
    if (mask.sum(axis=1) == 0).any():
        raise ValueError(
            f"prompt {int(np.argmin(mask.sum(axis=1)))} is empty (its attention_mask is all zeros)"
        )
    if mask[:, -1].min() == 0:
        raise ValueError("prompts must be left-padded: the last column of attention_mask must be all ones")
    vocab = model.config.vocab_size
    real = ids[mask.astype(bool)]
    if real.min() < 0 or real.max() >= vocab:
        bad = real[(real < 0) | (real >= vocab)][0]
        raise ValueError(f"token id {bad} is outside the vocabulary [0, {vocab})")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    longest = int(mask.sum(axis=1).max())
    if longest + max_new_tokens > model.config.max_position_embeddings:
        raise ValueError(
            f"prompt ({longest} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model's "
            f"max_position_embeddings ({model.config.max_position_embeddings})"
        )
    return ids.astype(np.int32), mask.astype(np.int32)


def check_seed(seed: int) -> np.uint32:
    """The sampling seed as the programs take it (``jax.random.key(seed)`` is made inside them)."""
    if not 0 <= seed < 2**32:
        raise ValueError(f"seed must be in [0, 2**32), got {seed}")
    return np.uint32(seed)


def eos_token_ids(model: LlamaForCausalLM, eos_token_id=None) -> tuple[int, ...]:
    """The ids that end a row: ``eos_token_id`` (an id or several; ``()`` for none), else the config's."""
    if eos_token_id is None:
        return tuple(model.config.eos_token_id)
    return (eos_token_id,) if isinstance(eos_token_id, int) else tuple(eos_token_id)


def pad_token_id(model: LlamaForCausalLM, eos: tuple[int, ...]) -> int:
    """The id that fills a row after its end: the config's ``pad_token_id``, else the first end id."""
    if model.config.pad_token_id is not None:
        return model.config.pad_token_id
    return eos[0] if eos else 0


def generate(
    model: LlamaForCausalLM,
    input_ids,
    attention_mask=None,
    *,
    max_new_tokens: int = 32,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    sampling: Sampling | None = None,
    seed: int = 0,
    eos_token_id: int | Sequence[int] | None = None,
    callback: Callable[[int, np.ndarray], None] | None = None,
) -> np.ndarray:
    """Generate up to ``max_new_tokens`` tokens for each row of a (left-padded) batch of prompts.

    Returns the new token ids, ``[batch, max_new_tokens]`` int32. A row stops at its first EOS token
    (``eos_token_id``, default: the config's; pass ``()`` to never stop) and the rest of the row is
    filled with the pad id (the config's ``pad_token_id``, else the first EOS id). Greedy unless
    ``temperature > 0`` (or pass ``sampling=Sampling(...)`` instead of the three); sampling is
    reproducible for a given ``seed``. ``callback(step, tokens)`` is
    called with each step's tokens ``[batch]``, in order, as they are produced (for streaming: the
    decode program then runs ``STREAM_STEPS`` steps per call and the host hands them on between calls).

    A model loaded with a mesh (``from_pretrained(..., mesh=...)``) generates on that mesh: the batch is
    split over its ``"batch"`` axis (padded up to a multiple of it with copies of the first row, which are
    dropped again) and the KV cache like the model's heads. Every process of a multi-process job calls
    this with the same prompts and gets the same tokens.
    """
    ids, mask = _check_inputs(model, input_ids, attention_mask, max_new_tokens)
    sampling = _sampling(sampling, temperature, top_k, top_p)
    eos = eos_token_ids(model, eos_token_id)
    pad_id = pad_token_id(model, eos)
    batch, prompt_len = ids.shape
    bucket = prompt_bucket(prompt_len)  # extra left padding changes nothing (masked)
    ids = np.pad(ids, ((0, 0), (bucket - prompt_len, 0)), constant_values=pad_id)
    mask = np.pad(mask, ((0, 0), (bucket - prompt_len, 0)))
    cache_len = _round_up(bucket + max_new_tokens, CACHE_BUCKET)
    kv_mask = np.pad(mask, ((0, 0), (0, cache_len - bucket))).astype(bool)
    mesh = mesh_of(model)
    if mesh is not None:  # pad the batch to a multiple of the "batch" axis, then split it over that axis
        extra = _round_up(batch, mesh.shape["batch"]) - batch
        ids, kv_mask = split_rows(
            mesh, *(np.concatenate([a, np.repeat(a[:1], extra, axis=0)]) for a in (ids, kv_mask))
        )
    tokens, _ = prefill_and_decode(
        model,
        None,  # an empty cache, made by the program
        ids,
        kv_mask,
        0,
        max_new_tokens,
        seed,
        eos,
        pad_id,
        sampling=sampling,
        steps=STREAM_STEPS if callback is not None else cache_len - bucket,
        mesh=mesh,
        callback=callback,
    )
    out = np.full((batch, max_new_tokens), pad_id, np.int32)
    out[:, : tokens.shape[1]] = tokens[:batch]
    return out


# ------------------------------------------------------------------------------- the slow baseline


@jax.jit
def _full_forward(model: LlamaForCausalLM, input_ids, attention_mask):
    """One full forward pass, compiled once per (model structure, buffer shape)."""
    return model(input_ids, attention_mask)


def generate_naive(
    model: LlamaForCausalLM,
    input_ids,
    attention_mask=None,
    *,
    max_new_tokens: int = 32,
    eos_token_id: int | Sequence[int] | None = None,
) -> np.ndarray:
    """Greedy decoding without a cache: every new token reruns the model over the whole sequence.

    The sequence lives in a fixed buffer of prompt + max_new_tokens slots so that the forward pass
    compiles once; the causal mask keeps the not-yet-written slots from influencing anything. Costs
    O(n) forward passes over n tokens each: what the KV cache removes. Same output as ``generate``.
    """
    ids, mask = _check_inputs(model, input_ids, attention_mask, max_new_tokens)
    eos = eos_token_ids(model, eos_token_id)
    pad_id = pad_token_id(model, eos)
    batch, prompt_len = ids.shape
    buffer = np.concatenate([ids, np.full((batch, max_new_tokens), pad_id, np.int32)], axis=1)
    full_mask = np.concatenate([mask, np.ones((batch, max_new_tokens), np.int32)], axis=1)
    done = np.zeros(batch, bool)
    for step in range(max_new_tokens):
        logits = _full_forward(model, jnp.asarray(buffer), jnp.asarray(full_mask))
        token = np.asarray(jnp.argmax(logits[:, prompt_len + step - 1], axis=-1)).astype(np.int32)
        token = np.where(done, pad_id, token)
        done |= np.isin(token, eos)
        buffer[:, prompt_len + step] = token
        if done.all():
            break
    return buffer[:, prompt_len:]

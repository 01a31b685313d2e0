"""Text generation: a jitted prefill and a jitted decode loop over a preallocated KV cache.

One call of ``generate`` runs one compiled XLA program: the prefill writes the whole (left-padded)
prompt into the cache and samples the first new token, then a ``jax.lax.while_loop`` feeds each new
token back, one cache slot at a time, until every row has hit EOS or the budget is spent. Shapes are
padded to buckets (prompt length to a multiple of ``PROMPT_BUCKET``, cache length to a multiple of
``CACHE_BUCKET``), so the program compiles once per (batch, prompt bucket, cache bucket, sampling
mode) and is reused by every later call that falls in the same buckets.

``generate_naive`` is the slow loop that rereads everything: one full forward pass per new token.
It is the baseline the book and the benchmark compare against, and the tests check that both give
the same tokens.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from .model import KVCache, LlamaForCausalLM
from .sharding import kv_cache_sharding, mesh_of, split_rows

PROMPT_BUCKET = 64
CACHE_BUCKET = 128


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


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


# ------------------------------------------------------------------------------- the fast program


@functools.partial(jax.jit, static_argnames=("graphdef", "cache_len", "sampling", "stream", "mesh"))
def _generate_program(
    graphdef,
    state,
    input_ids,
    prompt_mask,
    max_new_tokens,
    key,
    eos_ids,
    pad_id,
    *,
    cache_len: int,
    sampling: Sampling,
    stream: bool,
    mesh: Mesh | None,
):
    """Prefill + decode loop, compiled as one program. Returns new tokens [B, cache_len - P].

    On a ``mesh`` (a sharded model), the KV cache is laid out like the model (``kv_cache_sharding``)
    and the new tokens come back replicated, so that every process can read them."""
    model = nnx.merge(graphdef, state)
    batch, prompt_len = input_ids.shape
    budget = cache_len - prompt_len
    dtype = model.model.embed_tokens.embedding.get_value().dtype
    cache = KVCache.zeros(model.config, batch, cache_len, dtype)
    if mesh is not None:
        cache_sharding = kv_cache_sharding(model.config, mesh)
        cache = jax.tree.map(lambda a: jax.lax.with_sharding_constraint(a, cache_sharding), cache)
    kv_mask = jnp.zeros((batch, cache_len), bool).at[:, :prompt_len].set(prompt_mask.astype(bool))

    def emit(step, token, done):
        token = jnp.where(done, pad_id, token)
        if stream and mesh is None:
            jax.debug.callback(_stream_step, step, token, ordered=True)
        elif stream:  # XLA orders effects on one device only: _InStepOrder restores the order
            whole = jax.lax.with_sharding_constraint(token, NamedSharding(mesh, P()))
            jax.debug.callback(_stream_step, step, whole, ordered=False)
        return token, done | jnp.isin(token, eos_ids)

    # Prefill: the whole prompt in one pass; only the last position's logits are needed.
    hidden, cache = model.model(input_ids, kv_mask, cache, 0)
    logits = model.logits(hidden[:, -1])
    token, done = emit(0, sample_next(logits, jax.random.fold_in(key, 0), sampling), jnp.zeros(batch, bool))
    out = jnp.full((batch, budget), pad_id, jnp.int32).at[:, 0].set(token)

    def keep_going(carry):
        step, _, _, _, done, _ = carry
        return (step < max_new_tokens) & ~jnp.all(done)

    def decode_one(carry):
        step, token, cache, kv_mask, done, out = carry
        slot = prompt_len + step - 1  # the slot of the token we feed now
        kv_mask = jax.lax.dynamic_update_slice_in_dim(kv_mask, jnp.ones((batch, 1), bool), slot, axis=1)
        hidden, cache = model.model(token[:, None], kv_mask, cache, slot)
        logits = model.logits(hidden[:, 0])
        token, done = emit(step, sample_next(logits, jax.random.fold_in(key, step), sampling), done)
        out = jax.lax.dynamic_update_slice_in_dim(out, token[:, None], step, axis=1)
        return step + 1, token, cache, kv_mask, done, out

    carry = (jnp.int32(1), token, cache, kv_mask, done, out)
    out = jax.lax.while_loop(keep_going, decode_one, carry)[-1]
    return out if mesh is None else jax.lax.with_sharding_constraint(out, NamedSharding(mesh, P()))


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


def _eos_ids(model: LlamaForCausalLM, eos_token_id) -> tuple[int, ...]:
    if eos_token_id is None:
        return tuple(model.config.eos_token_id)
    return (eos_token_id,) if isinstance(eos_token_id, int) else tuple(eos_token_id)


def _pad_id(model: LlamaForCausalLM, eos: tuple[int, ...]) -> int:
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
    seed: int = 0,
    eos_token_id: int | Sequence[int] | None = None,
    callback: Callable[[int, np.ndarray], None] | None = None,
) -> np.ndarray:
    """Generate up to ``max_new_tokens`` tokens for each row of a (left-padded) batch of prompts.

    Returns the new token ids, ``[batch, max_new_tokens]`` int32. A row stops at its first EOS token
    (``eos_token_id``, default: the config's; pass ``()`` to never stop) and the rest of the row is
    filled with the pad id (the config's ``pad_token_id``, else the first EOS id). Greedy unless
    ``temperature > 0``; sampling is reproducible for a given ``seed``. ``callback(step, tokens)`` is
    called with each step's tokens ``[batch]`` as they are produced (for streaming).

    A model loaded with a mesh (``from_pretrained(..., mesh=...)``) generates on that mesh: the batch is
    split over its ``"batch"`` axis (padded up to a multiple of it with copies of the first row, which are
    dropped again) and the KV cache like the model's heads. Every process of a multi-process job calls
    this with the same prompts and gets the same tokens.
    """
    ids, mask = _check_inputs(model, input_ids, attention_mask, max_new_tokens)
    sampling = Sampling(temperature, top_k, top_p)
    eos = _eos_ids(model, eos_token_id)
    pad_id = _pad_id(model, eos)
    batch, prompt_len = ids.shape
    bucket = _round_up(prompt_len, PROMPT_BUCKET)  # extra left padding changes nothing (masked)
    ids = np.pad(ids, ((0, 0), (bucket - prompt_len, 0)), constant_values=pad_id)
    mask = np.pad(mask, ((0, 0), (bucket - prompt_len, 0)))
    cache_len = _round_up(bucket + max_new_tokens, CACHE_BUCKET)
    graphdef, state = nnx.split(model)
    mesh = mesh_of(state)
    if mesh is not None:  # pad the batch to a multiple of the "batch" axis, then split it over that axis
        extra = _round_up(batch, mesh.shape["batch"]) - batch
        ids, mask = split_rows(
            mesh, *(np.concatenate([a, np.repeat(a[:1], extra, axis=0)]) for a in (ids, mask))
        )
    global _active_callback
    _active_callback = None if callback is None else _InStepOrder(callback)
    try:
        tokens = _generate_program(
            graphdef,
            state,
            jnp.asarray(ids),
            jnp.asarray(mask),
            jnp.int32(max_new_tokens),
            jax.random.key(seed),
            jnp.asarray(eos or (-1,), jnp.int32),
            jnp.int32(pad_id),
            cache_len=cache_len,
            sampling=sampling,
            stream=callback is not None,
            mesh=mesh,
        )
        # replicated on a mesh: this process's first copy is the whole array
        return np.asarray(tokens.addressable_data(0))[:batch, :max_new_tokens]
    finally:
        _active_callback = None


# The compiled program calls this module-level function at every step when streaming is on; it
# forwards to the current call's callback, so one compiled program serves every callback.
_active_callback: Callable[[int, np.ndarray], None] | None = None


def _stream_step(step, tokens):
    if _active_callback is not None:
        _active_callback(int(step), np.asarray(tokens))


class _InStepOrder:
    """Passes (step, tokens) on to ``callback`` in step order, holding back any that arrive early."""

    def __init__(self, callback):
        self.callback, self.next_step, self.early = callback, 0, {}

    def __call__(self, step, tokens):
        self.early[step] = tokens
        while self.next_step in self.early:
            self.callback(self.next_step, self.early.pop(self.next_step))
            self.next_step += 1


# ------------------------------------------------------------------------------- the slow baseline


@nnx.jit
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
    eos = _eos_ids(model, eos_token_id)
    pad_id = _pad_id(model, eos)
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


# ---------------------------------------------------------------------------------- text in, text out


def encode_prompts(tokenizer, prompts, *, chat: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Strings (or, with ``chat=True``, strings as user messages or lists of message dicts) ->
    left-padded (ids, attention_mask). Chat prompts go through the tokenizer's chat template, which
    already contains the special tokens it needs."""
    if chat:
        conversations = [[{"role": "user", "content": p}] if isinstance(p, str) else list(p) for p in prompts]
        texts = [
            tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True)
            for c in conversations
        ]
    else:
        texts = list(prompts)
    encoded = [tokenizer(t, add_special_tokens=not chat)["input_ids"] for t in texts]
    for text, ids in zip(texts, encoded, strict=True):
        if not ids:
            raise ValueError(f"prompt {text!r} has no tokens")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return left_pad(encoded, pad_id)


def generate_text(
    model: LlamaForCausalLM,
    tokenizer,
    prompts,
    *,
    chat: bool = False,
    max_new_tokens: int = 64,
    stream: Callable[[str], None] | None = None,
    **sampling,
):
    """Generate from text: one prompt (a string, or with ``chat=True`` a list of message dicts) gives a
    string, a list of prompts gives a list of strings. ``stream(piece)`` receives the text as it is
    produced (one prompt only). Sampling keywords are those of ``generate``."""
    single = isinstance(prompts, str) or (chat and len(prompts) > 0 and isinstance(prompts[0], dict))
    batch = [prompts] if single else list(prompts)
    if stream is not None and len(batch) != 1:
        raise ValueError("stream works with one prompt at a time")
    ids, mask = encode_prompts(tokenizer, batch, chat=chat)
    eos = _eos_ids(model, sampling.pop("eos_token_id", None))
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in eos:
        eos = (*eos, tokenizer.eos_token_id)  # instruct models end their turn with their own token
    callback = None
    if stream is not None:
        callback = _TextStreamer(tokenizer, eos, stream)
    tokens = generate(
        model, ids, mask, max_new_tokens=max_new_tokens, eos_token_id=eos, callback=callback, **sampling
    )
    texts = [tokenizer.decode(_until_eos(row, eos), skip_special_tokens=True) for row in tokens]
    return texts[0] if single else texts


def _until_eos(row: np.ndarray, eos: tuple[int, ...]) -> list[int]:
    tokens = []
    for token in row.tolist():
        if token in eos:
            break
        tokens.append(token)
    return tokens


class _TextStreamer:
    """Turns streamed token ids into text pieces (decoding the whole row each time, so that characters
    spread over several tokens come out whole)."""

    def __init__(self, tokenizer, eos, sink):
        self.tokenizer, self.eos, self.sink = tokenizer, eos, sink
        self.tokens, self.text, self.finished = [], "", False

    def __call__(self, step, tokens):
        token = int(tokens[0])
        if self.finished or token in self.eos:
            self.finished = True
            return
        self.tokens.append(token)
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
            self.sink(text[len(self.text) :])
            self.text = text

"""Text in, text out: prompts to padded token ids, streamed ids to text, rows cut at their end token.

``generate_text`` is ``generate`` with these around it; ``llama_jax.ChatSession`` uses the same pieces.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from .generate import eos_token_ids, generate, left_pad
from .model import LlamaForCausalLM


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
    eos = text_eos(model, tokenizer, sampling.pop("eos_token_id", None))
    callback = None
    if stream is not None:
        callback = TextStreamer(tokenizer, eos, stream)
    tokens = generate(
        model, ids, mask, max_new_tokens=max_new_tokens, eos_token_id=eos, callback=callback, **sampling
    )
    texts = [tokenizer.decode(until_eos(row, eos), skip_special_tokens=True) for row in tokens]
    return texts[0] if single else texts


def text_eos(model: LlamaForCausalLM, tokenizer, eos_token_id=None) -> tuple[int, ...]:
    """The model's EOS ids (or ``eos_token_id``) plus the tokenizer's: instruct models end their turn
    with their own token."""
    eos = eos_token_ids(model, eos_token_id)
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in eos:
        eos = (*eos, tokenizer.eos_token_id)
    return eos


def until_eos(row: np.ndarray, eos: tuple[int, ...]) -> list[int]:
    """A row of generated ids up to (not including) its first end token."""
    tokens = []
    for token in row.tolist():
        if token in eos:
            break
        tokens.append(token)
    return tokens


class TextStreamer:
    """A ``generate`` callback that hands ``sink`` the text of row 0 piece by piece, until an ``eos`` id
    (decoding the whole row each time, so that characters spread over several tokens come out whole)."""

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

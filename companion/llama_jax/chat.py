"""A conversation that keeps its KV cache from turn to turn: ``ChatSession``.

Each turn renders the whole conversation with the tokenizer's chat template, as ``generate_text``
does, but only the tokens the cache does not hold yet are run through the model (the new user message
and the template's markup around it): turn 2 costs what its own message costs, not the whole history.
The answer comes from the same two compiled programs as ``generate`` (``prefill_and_decode`` at the
cache's current end), so a greedy answer is the one ``generate_text`` gives for the whole
conversation.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from .generate import STREAM_STEPS, Sampling, check_seed, pad_token_id, prefill_and_decode, prompt_bucket
from .model import KVCache, LlamaForCausalLM
from .sharding import mesh_of
from .text import TextStreamer, text_eos, until_eos

FIRST_CACHE_LENGTH = 256  # slots; the cache doubles when a turn needs more, up to max_length
CHUNK_STEPS = 32  # decode steps per compiled call when not streaming


class ChatSession:
    """``session.ask("...")`` answers and remembers; ``session.messages`` is the conversation so far.

    ``system`` is the system prompt (None: the chat template's default, if it has one). The cache holds
    at most ``max_length`` slots (default: the model's ``max_position_embeddings``, at most 8192); a turn
    that would not fit raises a ValueError that says so (``reset()`` starts a new conversation).
    ``prefilled`` is the number of tokens the last turn ran through the prefill.
    """

    def __init__(
        self,
        model: LlamaForCausalLM,
        tokenizer,
        system: str | None = None,
        *,
        max_length: int | None = None,
    ):
        if getattr(tokenizer, "chat_template", None) is None:
            raise ValueError("this tokenizer has no chat template: ChatSession needs an instruct model's")
        self.model, self.tokenizer, self.system = model, tokenizer, system
        limit = model.config.max_position_embeddings
        self.max_length = min(max_length or min(limit, 8192), limit)
        self.mesh = mesh_of(model)
        if self.mesh is not None and self.mesh.shape.get("batch", 1) != 1:
            raise ValueError("a chat is one conversation (batch 1): use a mesh with batch=1")
        self.reset()

    def reset(self) -> None:
        """Forget the conversation (and empty the cache)."""
        self.messages: list[dict] = (
            [] if self.system is None else [{"role": "system", "content": self.system}]
        )
        self.cache: KVCache | None = None
        self.kv_mask = np.zeros((1, 0), bool)  # which slots hold a real token
        self.ids: list[int] = []  # the tokens in the cache, in order ...
        self.slots: list[int] = []  # ... and the slot of each
        self.prefilled = 0

    def _keep(self, count: int) -> None:
        """Keep the first ``count`` cached tokens, forget the rest (their slots are masked out)."""
        end = self.slots[count - 1] + 1 if count else 0
        self.kv_mask[:, end:] = False
        self.ids, self.slots = self.ids[:count], self.slots[:count]

    def _room(self, slots: int) -> None:
        """Make the cache at least ``slots`` long (doubling it), or say that the conversation is too long."""
        if slots > self.max_length:
            raise ValueError(
                f"the conversation needs {slots} cache slots but this session holds {self.max_length} "
                "(max_length): start a new one with reset() (/reset in the CLI)"
            )
        length = self.kv_mask.shape[1]
        if length >= slots:
            return
        while length < slots:
            length = min(max(2 * length, FIRST_CACHE_LENGTH), self.max_length)
        if self.cache is not None:  # the old slots at the front, empty ones behind (none yet: the
            # first prefill makes the cache, as long as kv_mask)
            grow = lambda a: jnp.pad(a, ((0, 0), (0, 0), (0, length - a.shape[2]), (0, 0)))
            self.cache = jax.tree.map(grow, self.cache)
        self.kv_mask = np.pad(self.kv_mask, ((0, 0), (0, length - self.kv_mask.shape[1])))

    def ask(
        self,
        message: str,
        *,
        max_new_tokens: int = 256,
        stream: Callable[[str], None] | None = None,
        stop: Callable[[], bool] | None = None,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int = 0,
    ) -> str:
        """Add the user's ``message``, answer it (``stream(piece)`` receives the text as it comes) and
        keep both. ``stop()``, checked between decode calls, ends the answer early (Ctrl-C in the CLI);
        the partial answer is kept."""
        sampling = Sampling(temperature, top_k, top_p)  # bad settings are refused before anything changes
        check_seed(seed)
        tokenizer = self.tokenizer
        messages = [*self.messages, {"role": "user", "content": message}]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
        # The cache may hold tokens the template writes differently (an answer re-tokenized): keep the
        # longest common prefix, run the rest. Normally that is all of the cache.
        same = 0
        for cached, new in zip(self.ids, ids, strict=False):
            if cached != new:
                break
            same += 1
        same = min(same, len(ids) - 1)  # at least one token to prefill: its logits give the answer
        self._keep(same)
        new_ids = ids[same:]
        start = self.slots[-1] + 1 if self.slots else 0
        bucket = prompt_bucket(len(new_ids))
        self._room(start + bucket + max_new_tokens)

        # the new tokens, left-padded to the bucket, go to slots start .. start + bucket - 1
        chunk = np.zeros((1, bucket), np.int32)
        chunk[0, bucket - len(new_ids) :] = new_ids
        self.kv_mask[0, start + bucket - len(new_ids) : start + bucket] = True
        eos = text_eos(self.model, tokenizer)
        self.prefilled = len(new_ids)
        self.ids += new_ids
        self.slots += range(start + bucket - len(new_ids), start + bucket)
        cache, self.cache = self.cache, None  # donated to the program: never reuse the old buffers
        tokens, state = prefill_and_decode(
            self.model,
            cache,  # None at the first turn: the program makes an empty one
            chunk,
            self.kv_mask.copy(),  # ours changes below
            start,
            max_new_tokens,
            seed,
            eos,
            pad_token_id(self.model, eos),
            sampling=sampling,
            steps=STREAM_STEPS if stream is not None else CHUNK_STEPS,
            mesh=self.mesh,
            callback=None if stream is None else TextStreamer(tokenizer, eos, stream),
            stop=stop,
        )
        self.cache = state.cache
        # every new token but the last was fed back into the cache, from slot start + bucket on
        answer = until_eos(tokens[0], eos)
        fed = tokens[0, : tokens.shape[1] - 1].tolist()
        self.kv_mask[0, start + bucket : start + bucket + len(fed)] = True
        self.ids += fed
        self.slots += range(start + bucket, start + bucket + len(fed))
        reply = tokenizer.decode(answer, skip_special_tokens=True)
        self.messages = [*messages, {"role": "assistant", "content": reply}]
        return reply

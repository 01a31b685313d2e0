"""Fine-tuning data: mlx-lm's JSONL formats, tokenized into (token ids, loss mask) rows, and the batches a
run takes from them.

A dataset is a ``.jsonl`` file, or a directory holding ``train.jsonl`` and optionally ``valid.jsonl``.
Each line is one JSON object in one of three formats (mlx-lm's, so its datasets work unchanged):

- ``{"messages": [{"role": ..., "content": ...}, ...]}``: rendered by the tokenizer's chat template; the
  loss counts every assistant turn (its text and the end-of-turn marker), not the rest.
- ``{"prompt": ..., "completion": ...}``: a user turn and an assistant turn through the chat template
  (or, without one, the plain prompt then the completion and the end-of-sequence token); the loss
  counts the completion.
- ``{"text": ...}``: plain text and the end-of-sequence token; the loss counts every token.

Batches are a pure function of (dataset, step, seed): step ``s`` takes rows ``s * B ... s * B + B - 1``
of an endless stream that visits every example once per epoch in an order shuffled by ``(seed, epoch)``.
So a resumed run sees exactly the batches the uninterrupted run saw, and in a job of several processes
each one builds only its own rows of each batch (rows ``p * B/P ... (p + 1) * B/P - 1``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Iterator

import numpy as np

PAD_TO = 32  # batch widths are rounded up to a multiple of this: few shapes, so few compilations


HELD_OUT_TEXT = os.path.join(os.path.dirname(__file__), "texts", "held_out.txt")


def held_out_text() -> str:
    """About 1,200 words of plain English prose written for this package (two short essays), so no
    model has seen them: the text chapter 13 measures perplexity on."""
    with open(HELD_OUT_TEXT, encoding="utf-8") as f:
        return f.read()


class DataError(ValueError):
    """A dataset that cannot be used: the message names the file and line."""


@dataclasses.dataclass(frozen=True)
class Dataset:
    """Tokenized examples of one JSONL file: ``examples[i]`` is (token ids [T], loss mask [T]), int32."""

    path: str
    examples: tuple[tuple[np.ndarray, np.ndarray], ...]
    max_length: int
    truncated: int  # rows longer than max_length, cut to it
    fingerprint: str  # sha256 of the file's bytes: a resumed run checks it trains on the same data

    def __len__(self) -> int:
        return len(self.examples)

    @property
    def tokens(self) -> int:
        return sum(len(ids) for ids, _ in self.examples)


def data_files(path: str | os.PathLike) -> tuple[str, str | None]:
    """(training file, validation file or None) of a ``.jsonl`` file or a directory of them."""
    path = os.fspath(path)
    if os.path.isdir(path):
        train, valid = os.path.join(path, "train.jsonl"), os.path.join(path, "valid.jsonl")
        if not os.path.isfile(train):
            raise DataError(f"--data {path}: the directory has no train.jsonl")
        return train, valid if os.path.isfile(valid) else None
    if not os.path.isfile(path):
        raise DataError(f"--data {path}: no such file or directory")
    if not path.endswith(".jsonl"):
        raise DataError(f"--data {path}: expected a .jsonl file or a directory with train.jsonl")
    return path, None


def read_jsonl(path: str) -> list[tuple[int, dict]]:
    """(line number, object) for every non-blank line of ``path``."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise DataError(f"{path}:{number}: not valid JSON ({error.msg})") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}:{number}: expected a JSON object, got {type(row).__name__}")
            rows.append((number, row))
    if not rows:
        raise DataError(f"{path}: the dataset is empty (no JSON lines)")
    return rows


def _token_ids(tokenizer, text: str, special: bool = False) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def _render(tokenizer, messages, generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def _chat_pieces(tokenizer, messages: list[dict], where: str) -> list[tuple[str, int]]:
    """The conversation's text as (piece, is target) pairs: each assistant turn is the text its render
    adds after the generation prompt. Each boundary comes from rendering the conversation up to it, so
    the pieces join into exactly the template's text of the whole conversation."""
    pieces, done = [], ""
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = _render(tokenizer, messages[:i], generation_prompt=True) if i else ""
        turn = _render(tokenizer, messages[: i + 1])
        if not (prompt.startswith(done) and turn.startswith(prompt)):
            raise DataError(
                f"{where}: the chat template does not render this conversation turn by turn "
                "(an earlier render is not a prefix of a later one)"
            )
        pieces += [(prompt[len(done) :], 0), (turn[len(prompt) :], 1)]
        done = turn
    whole = _render(tokenizer, messages)
    if not whole.startswith(done):
        raise DataError(f"{where}: the chat template does not render this conversation turn by turn")
    pieces.append((whole[len(done) :], 0))
    return [(text, target) for text, target in pieces if text]


def _check_messages(messages, where: str) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: 'messages' must be a non-empty list of {{'role', 'content'}} objects")
    for message in messages:
        if not (
            isinstance(message, dict)
            and isinstance(message.get("role"), str)
            and isinstance(message.get("content"), str)
        ):
            raise DataError(f"{where}: each message needs a string 'role' and a string 'content'")
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: the conversation has no assistant turn to learn")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def _strings(row: dict, keys: tuple[str, ...], where: str) -> list[str]:
    for key in keys:
        if not isinstance(row[key], str):
            raise DataError(f"{where}: '{key}' must be a string, got {type(row[key]).__name__}")
    return [row[key] for key in keys]


def encode_row(row: dict, tokenizer, where: str = "row") -> tuple[np.ndarray, np.ndarray]:
    """(token ids, loss mask) of one JSONL object; ``where`` ("file:line") names it in errors."""
    eos = tokenizer.eos_token_id
    has_template = getattr(tokenizer, "chat_template", None) is not None
    if "messages" in row:
        messages = _check_messages(row["messages"], where)
        if not has_template:
            raise DataError(f"{where}: 'messages' rows need a chat template, and the tokenizer has none")
        pieces = _chat_pieces(tokenizer, messages, where)
        ids, mask = [], []
        for text, target in pieces:
            tokens = _token_ids(tokenizer, text)
            ids += tokens
            mask += [target] * len(tokens)
    elif "prompt" in row and "completion" in row:
        prompt, completion = _strings(row, ("prompt", "completion"), where)
        if has_template:
            conversation = [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
            (ids, mask) = encode_row({"messages": conversation}, tokenizer, where)
            return ids, mask
        head, tail = _token_ids(tokenizer, prompt, special=True), _token_ids(tokenizer, completion)
        tail += [eos] if eos is not None else []
        ids, mask = head + tail, [0] * len(head) + [1] * len(tail)
    elif "text" in row:
        (text,) = _strings(row, ("text",), where)
        ids = _token_ids(tokenizer, text, special=True) + ([eos] if eos is not None else [])
        mask = [1] * len(ids)
    else:
        raise DataError(
            f"{where}: unknown format: expected 'messages', 'prompt' and 'completion', or 'text'; "
            f"got keys {sorted(row)}"
        )
    return np.asarray(ids, np.int32), np.asarray(mask, np.int32)


def load_dataset(path: str, tokenizer, max_length: int) -> Dataset:
    """Read and tokenize every row of ``path``, cutting rows longer than ``max_length`` tokens."""
    if max_length < 2:
        raise DataError(f"--max-length must be at least 2, got {max_length}")
    examples, truncated = [], 0
    for number, row in read_jsonl(path):
        ids, mask = encode_row(row, tokenizer, f"{path}:{number}")
        if len(ids) > max_length:
            ids, mask, truncated = ids[:max_length], mask[:max_length], truncated + 1
        examples.append((ids, mask))
    if not any(mask[1:].any() for _, mask in examples):
        raise DataError(f"{path}: no row has a token to learn within --max-length {max_length}")
    with open(path, "rb") as f:
        fingerprint = hashlib.sha256(f.read()).hexdigest()
    return Dataset(path, tuple(examples), max_length, truncated, fingerprint)


def _width(dataset: Dataset, indices) -> int:
    """Columns of a batch holding these examples: the longest, rounded up to ``PAD_TO``, at most max_length."""
    longest = max((len(dataset.examples[i][0]) for i in indices if i is not None), default=1)
    return min(-(-longest // PAD_TO) * PAD_TO, dataset.max_length)


def _rows(dataset: Dataset, indices, width: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Right-padded [len(indices), width] input_ids, attention_mask, loss_mask (None: an empty row)."""
    ids, attention, loss = (np.zeros((len(indices), width), np.int32) for _ in range(3))
    for row, index in enumerate(indices):
        if index is None:
            continue
        tokens, mask = dataset.examples[index]
        ids[row, : len(tokens)], attention[row, : len(tokens)], loss[row, : len(tokens)] = tokens, 1, mask
    return ids, attention, loss


def _own(batch_size: int, process_index: int, process_count: int) -> slice:
    if batch_size % process_count:
        raise DataError(f"--batch {batch_size} cannot be split evenly over {process_count} processes")
    per = batch_size // process_count
    return slice(process_index * per, (process_index + 1) * per)


def batch_at(
    dataset: Dataset,
    step: int,
    batch_size: int,
    *,
    seed: int = 0,
    process_index: int = 0,
    process_count: int = 1,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """This process's rows of training batch ``step``: input_ids, attention_mask, loss_mask [B/P, W]. The
    width W is the same in every process (it depends on the whole batch)."""
    n = len(dataset)
    positions = range(step * batch_size, (step + 1) * batch_size)
    orders: dict[int, np.ndarray] = {}
    indices = []
    for position in positions:
        epoch = position // n
        if epoch not in orders:
            orders[epoch] = np.random.default_rng([seed, epoch]).permutation(n)
        indices.append(int(orders[epoch][position % n]))
    width = _width(dataset, indices)
    return _rows(dataset, indices[_own(batch_size, process_index, process_count)], width)


def eval_batches(
    dataset: Dataset, batch_size: int, *, process_index: int = 0, process_count: int = 1
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """This process's rows of every evaluation batch, in file order; the last batch is filled with empty
    rows (no real tokens), so every batch has ``batch_size`` rows and the loss counts each example once."""
    own = _own(batch_size, process_index, process_count)
    for start in range(0, len(dataset), batch_size):
        indices = list(range(start, min(start + batch_size, len(dataset))))
        indices += [None] * (batch_size - len(indices))
        yield _rows(dataset, indices[own], _width(dataset, indices))

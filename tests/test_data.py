"""``llama_jax.data``: mlx-lm's three JSONL formats tokenized with the right loss mask, batches that are a
pure function of the step (so a resumed run sees the same data) split by process, and one-line errors
naming file and line."""

from __future__ import annotations

import json

import numpy as np
import pytest

import llama_jax
from llama_jax.data import DataError, batch_at, data_files, encode_row, eval_batches, load_dataset


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir):
    return llama_jax.load_tokenizer(smollm2_dir)


def targets(tokenizer, ids, mask) -> str:
    return "".join(tokenizer.decode([t]) for t, m in zip(ids, mask, strict=True) if m)


def test_messages_learn_every_assistant_turn_and_nothing_else(tokenizer):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "And then?"},
        {"role": "assistant", "content": "Goodbye."},
    ]
    ids, mask = encode_row({"messages": messages}, tokenizer)
    # the tokens are exactly the chat template's text of the whole conversation
    whole = tokenizer(tokenizer.apply_chat_template(messages, tokenize=False), add_special_tokens=False)
    assert ids.tolist() == list(whole["input_ids"])
    learned = targets(tokenizer, ids, mask)
    print("learned:", repr(learned))
    assert learned == "Hello!<|im_end|>\nGoodbye.<|im_end|>\n"


def test_prompt_completion_goes_through_the_chat_template(tokenizer):
    ids, mask = encode_row({"prompt": "2+2?", "completion": "4"}, tokenizer)
    conversation = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]
    assert ids.tolist() == list(
        tokenizer(tokenizer.apply_chat_template(conversation, tokenize=False), add_special_tokens=False)[
            "input_ids"
        ]
    )
    assert targets(tokenizer, ids, mask) == "4<|im_end|>\n"


def test_text_learns_every_token_and_ends_with_eos(tokenizer):
    ids, mask = encode_row({"text": "plain words"}, tokenizer)
    assert ids[-1] == tokenizer.eos_token_id and mask.all()
    assert tokenizer.decode(ids[:-1]) == "plain words"


def test_without_a_chat_template_prompts_are_plain(tokenizer, monkeypatch):
    monkeypatch.setattr(tokenizer, "chat_template", None)
    ids, mask = encode_row({"prompt": "Q: 2+2? A:", "completion": " 4"}, tokenizer)
    assert tokenizer.decode(ids) == "Q: 2+2? A: 4<|im_end|>"
    assert targets(tokenizer, ids, mask) == " 4<|im_end|>"
    with pytest.raises(DataError, match="x.jsonl:3: 'messages' rows need a chat template"):
        encode_row({"messages": [{"role": "assistant", "content": "a"}]}, tokenizer, "x.jsonl:3")


def write(path, lines) -> str:
    path.write_text("".join(line + "\n" for line in lines))
    return str(path)


def test_a_file_or_a_directory(tmp_path):
    (tmp_path / "train.jsonl").write_text('{"text": "a"}\n')
    assert data_files(tmp_path) == (str(tmp_path / "train.jsonl"), None)
    (tmp_path / "valid.jsonl").write_text('{"text": "b"}\n')
    assert data_files(tmp_path) == (str(tmp_path / "train.jsonl"), str(tmp_path / "valid.jsonl"))
    assert data_files(tmp_path / "valid.jsonl") == (str(tmp_path / "valid.jsonl"), None)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="has no train.jsonl"):
        data_files(empty)
    with pytest.raises(DataError, match="no such file or directory"):
        data_files(tmp_path / "missing.jsonl")


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        (['{"text": "ok"}', '{"text": '], r"bad.jsonl:2: not valid JSON"),
        (['{"text": "ok"}', "", "[1, 2]"], r"bad.jsonl:3: expected a JSON object, got list"),
        (['{"question": "?"}'], r"bad.jsonl:1: unknown format: .*got keys \['question'\]"),
        (['{"text": 3}'], r"bad.jsonl:1: 'text' must be a string, got int"),
        (['{"messages": [{"role": "user", "content": "hi"}]}'], r"bad.jsonl:1: .*no assistant turn"),
        (['{"messages": [{"role": "user"}]}'], r"bad.jsonl:1: each message needs"),
        (["", "  "], r"bad.jsonl: the dataset is empty"),
    ],
)
def test_bad_rows_name_file_and_line(tokenizer, tmp_path, lines, message):
    path = write(tmp_path / "bad.jsonl", lines)
    with pytest.raises(DataError, match=message) as error:
        load_dataset(path, tokenizer, 64)
    assert "\n" not in str(error.value)
    print(error.value)


def test_long_rows_are_cut_and_counted(tokenizer, tmp_path):
    path = write(tmp_path / "d.jsonl", [json.dumps({"text": "word " * 50}), json.dumps({"text": "short"})])
    dataset = load_dataset(path, tokenizer, 16)
    assert dataset.truncated == 1 and [len(ids) for ids, _ in dataset.examples] == [16, 2]
    assert dataset.tokens == 18 and len(dataset.fingerprint) == 64


@pytest.fixture
def dataset(tokenizer, tmp_path):
    rows = [json.dumps({"text": "x " * (i + 1)}) for i in range(10)]
    return load_dataset(write(tmp_path / "ten.jsonl", rows), tokenizer, 64)


def test_batches_depend_on_the_step_only_and_visit_every_row_each_epoch(dataset):
    seen = []
    for step in range(5):  # 5 batches of 4 = 2 epochs of 10
        ids, attention, loss = batch_at(dataset, step, 4, seed=3)
        assert ids.shape == attention.shape == loss.shape == (4, 32)
        again = batch_at(dataset, step, 4, seed=3)
        assert all(np.array_equal(a, b) for a, b in zip((ids, attention, loss), again, strict=True))
        seen += [int(row.sum()) for row in attention]  # each example has its own length
    first, second = sorted(seen[:10]), sorted(seen[10:])
    lengths = sorted(len(ids) for ids, _ in dataset.examples)
    assert first == second == lengths
    assert seen[:10] != seen[10:]  # a new order each epoch
    assert not np.array_equal(batch_at(dataset, 0, 4, seed=3)[0], batch_at(dataset, 0, 4, seed=4)[0])


def test_each_process_builds_only_its_rows(dataset):
    whole = batch_at(dataset, 7, 4, seed=1)
    parts = [batch_at(dataset, 7, 4, seed=1, process_index=p, process_count=2) for p in range(2)]
    for k in range(3):
        assert parts[0][k].shape == (2, whole[k].shape[1])
        assert np.array_equal(np.concatenate([parts[0][k], parts[1][k]]), whole[k])
    with pytest.raises(DataError, match="--batch 4 cannot be split evenly over 3 processes"):
        batch_at(dataset, 0, 4, process_index=0, process_count=3)


def test_eval_batches_cover_the_file_once_in_order(dataset):
    batches = list(eval_batches(dataset, 4))
    assert [b[0].shape[0] for b in batches] == [4, 4, 4]
    real = np.concatenate([b[1] for b in batches]).sum(axis=1)
    assert real.tolist() == [len(ids) for ids, _ in dataset.examples] + [0, 0]


def test_perplexity_equals_transformers_on_the_same_windows(tiny_checkpoints):
    """train.perplexity on 300 tokens in windows of 128 (the last one padded, the last batch padded
    with rows that count nothing) equals exp of transformers' mean loss over the same windows."""
    import jax.numpy as jnp
    import torch
    from conftest import torch_model

    directory = tiny_checkpoints["llama32_tied"]
    ids = np.random.RandomState(3).randint(3, 256, 300)
    ours = llama_jax.train.perplexity(
        llama_jax.from_pretrained(directory, dtype=jnp.float32, progress=False), ids, window=128, batch_size=2
    )
    reference = torch_model(directory)
    total = count = 0.0
    with torch.no_grad():
        for start in range(0, ids.size, 128):
            window = torch.as_tensor(ids[start : start + 128])[None]
            total += float(reference(window, labels=window).loss) * (window.shape[1] - 1)
            count += window.shape[1] - 1
    expected = float(np.exp(total / count))
    print(f"perplexity: llama_jax {ours:.4f}, transformers {expected:.4f}")
    assert abs(ours - expected) <= 1e-4 * expected
    with pytest.raises(ValueError, match="at least 2 tokens"):
        llama_jax.train.perplexity(None, [5])


def test_held_out_text_ships_with_the_package():
    text = llama_jax.data.held_out_text()
    assert len(text.split()) > 1000 and text.isascii()

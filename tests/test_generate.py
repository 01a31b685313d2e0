"""Fast generation: the jitted, cached path against the full-recompute loop and transformers' generate."""

import importlib

import jax.numpy as jnp
import numpy as np
import pytest
import torch

import llama_jax
from llama_jax.generate import _decode, _prefill, prompt_bucket

generate_module = importlib.import_module("llama_jax.generate")  # llama_jax.generate is the function

CASES = ["llama32_tied", "untied", "smollm2"]


def prompts_for(case, directory, vocab):
    if case == "smollm2":
        tokenizer = llama_jax.load_tokenizer(directory)
        texts = [
            "The capital of France is",
            "def fibonacci(n):",
            "Once upon a time, in a land far away, there lived",
        ]
        return [tokenizer(t)["input_ids"] for t in texts]
    rng = np.random.default_rng(7)
    return [rng.integers(3, vocab, size=n).tolist() for n in (5, 17, 11)]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("batch", [1, 3])
def test_cached_equals_naive_equals_transformers(models, case, batch):
    directory, model = models(case)
    ids, mask = llama_jax.left_pad(prompts_for(case, directory, model.config.vocab_size)[:batch])
    fast = llama_jax.generate(model, ids, mask, max_new_tokens=16)
    naive = llama_jax.generate_naive(model, ids, mask, max_new_tokens=16)
    with torch.no_grad():
        expected = (
            models.reference(case)
            .generate(
                torch.as_tensor(ids), attention_mask=torch.as_tensor(mask), do_sample=False, max_new_tokens=16
            )[:, ids.shape[1] :]
            .numpy()
        )
    np.testing.assert_array_equal(fast, naive)
    np.testing.assert_array_equal(fast[:, : expected.shape[1]], expected)
    for row in range(batch):  # each row of the padded batch gives what its prompt gives alone
        prompt = ids[row, mask[row].astype(bool)]
        np.testing.assert_array_equal(
            llama_jax.generate(model, prompt[None], max_new_tokens=16)[0], fast[row]
        )


def test_rows_stop_at_eos_and_are_padded(models):
    _, model = models("untied")
    ids, mask = llama_jax.left_pad([[5, 6, 7, 8], [9, 10, 11, 12, 13, 14]])
    free = llama_jax.generate(model, ids, mask, max_new_tokens=12, eos_token_id=())
    eos = int(free[0, 4])  # make row 0's fifth token the EOS token
    stopped = llama_jax.generate(model, ids, mask, max_new_tokens=12, eos_token_id=eos)
    np.testing.assert_array_equal(stopped[0, :5], free[0, :5])
    first_eos = {row: next((i for i, t in enumerate(free[row]) if t == eos), None) for row in (0, 1)}
    for row, at in first_eos.items():
        if at is None:
            np.testing.assert_array_equal(stopped[row], free[row])
        else:
            np.testing.assert_array_equal(stopped[row, : at + 1], free[row, : at + 1])
            # so the pad id is the (first) EOS id, as in transformers
            assert model.config.pad_token_id is None
            assert (stopped[row, at + 1 :] == eos).all()


def test_sampling_is_reproducible_for_a_seed(models):
    _, model = models("untied")
    ids = np.array([[5, 6, 7, 8]])
    kwargs = dict(max_new_tokens=24, temperature=1.0, top_p=0.95, eos_token_id=())
    first = llama_jax.generate(model, ids, seed=3, **kwargs)
    np.testing.assert_array_equal(first, llama_jax.generate(model, ids, seed=3, **kwargs))
    assert not np.array_equal(first, llama_jax.generate(model, ids, seed=4, **kwargs))
    assert not np.array_equal(first, llama_jax.generate(model, ids, max_new_tokens=24, eos_token_id=()))


def test_top_k_1_equals_greedy(models):
    _, model = models("untied")
    ids = np.array([[5, 6, 7, 8]])
    greedy = llama_jax.generate(model, ids, max_new_tokens=16, eos_token_id=())
    top1 = llama_jax.generate(
        model, ids, max_new_tokens=16, temperature=1.5, top_k=1, seed=9, eos_token_id=()
    )
    np.testing.assert_array_equal(top1, greedy)
    sampling = llama_jax.Sampling(temperature=1.5, top_k=1)  # the same, as one value
    np.testing.assert_array_equal(
        llama_jax.generate(model, ids, max_new_tokens=16, sampling=sampling, seed=9, eos_token_id=()), greedy
    )
    with pytest.raises(ValueError, match="not both"):
        llama_jax.generate(model, ids, sampling=sampling, temperature=0.5)


def test_sample_next_filters():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
    import jax

    from llama_jax.generate import sample_next

    keys = jax.random.split(jax.random.key(0), 400)
    top2 = {int(sample_next(logits, k, llama_jax.Sampling(1.0, top_k=2))[0]) for k in keys}
    assert top2 == {0, 1}
    nucleus = {int(sample_next(logits, k, llama_jax.Sampling(1.0, top_p=0.85))[0]) for k in keys}
    assert nucleus == {0, 1, 2}  # 0.5 + 0.3 < 0.85, so the third token is needed; the fourth never


def test_one_compile_per_bucket(models):
    def compiled():
        return _prefill._cache_size(), _decode._cache_size()

    _, model = models("llama32_tied")
    llama_jax.generate(model, np.arange(3, 20)[None], max_new_tokens=8)  # 17 tokens: the 32 bucket
    before = compiled()
    llama_jax.generate(model, np.arange(3, 33)[None], max_new_tokens=8)  # same prompt bucket
    llama_jax.generate(model, np.arange(3, 25)[None], max_new_tokens=20)  # same cache bucket
    assert compiled() == before and sum(before) > 0


@pytest.mark.parametrize("length, bucket", [(1, 16), (5, 16), (16, 16), (17, 32), (64, 64), (65, 128)])
def test_prompt_buckets_are_powers_of_two_from_16(length, bucket):
    assert prompt_bucket(length) == bucket


def test_outputs_do_not_depend_on_the_bucket(models, monkeypatch):
    """The same prompts padded to 16 positions and to 64 (the old fixed bucket) give the same tokens."""
    directory, model = models("smollm2")
    ids, mask = llama_jax.left_pad(prompts_for("smollm2", directory, model.config.vocab_size))
    small = llama_jax.generate(model, ids, mask, max_new_tokens=12)
    monkeypatch.setattr(generate_module, "prompt_bucket", lambda length: 64)
    np.testing.assert_array_equal(llama_jax.generate(model, ids, mask, max_new_tokens=12), small)
    assert ids.shape[1] <= 16  # so the first call did use the 16 bucket


def test_callback_streams_every_token(models):
    _, model = models("untied")
    seen = []
    out = llama_jax.generate(
        model,
        np.array([[5, 6, 7]]),
        max_new_tokens=10,
        eos_token_id=(),
        callback=lambda step, tokens: seen.append((step, int(tokens[0]))),
    )
    assert [s for s, _ in seen] == list(range(10))
    assert [t for _, t in seen] == out[0].tolist()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(input_ids=np.zeros((1, 0), np.int32)), "at least one token"),
        (dict(input_ids=np.array([[1, 2]]), attention_mask=np.array([[0, 0]])), "prompt 0 is empty"),
        (dict(input_ids=np.array([[1, 2, 0]]), attention_mask=np.array([[1, 1, 0]])), "left-padded"),
        (dict(input_ids=np.array([[1, 256]])), "token id 256 is outside the vocabulary"),
        (dict(input_ids=np.array([[1, -1]])), "token id -1 is outside the vocabulary"),
        (
            dict(input_ids=np.array([[1, 2]]), max_new_tokens=2047),
            "exceeds the model's max_position_embeddings",
        ),
        (dict(input_ids=np.array([[1, 2]]), max_new_tokens=0), "max_new_tokens must be >= 1"),
        (dict(input_ids=np.array([[1, 2]]), temperature=-1.0), "temperature must be >= 0"),
        (dict(input_ids=np.array([[1, 2]]), temperature=1.0, top_p=1.5), r"top_p must be in \(0, 1\]"),
    ],
)
def test_bad_input_is_a_clear_value_error(models, kwargs, message):
    _, model = models("llama32_tied")
    with pytest.raises(ValueError, match=message):
        llama_jax.generate(model, **kwargs)


def test_generate_text_chat_and_stream(models):
    directory, model = models("smollm2")
    tokenizer = llama_jax.load_tokenizer(directory)
    pieces = []
    answer = llama_jax.generate_text(
        model, tokenizer, "What is the capital of France?", chat=True, max_new_tokens=24, stream=pieces.append
    )
    assert "Paris" in answer and "".join(pieces) == answer
    both = llama_jax.generate_text(
        model, tokenizer, ["The capital of France is", "2 + 2 ="], max_new_tokens=8
    )
    assert len(both) == 2 and "Paris" in both[0]
    with pytest.raises(ValueError, match="has no tokens"):
        llama_jax.generate_text(model, tokenizer, "")


@pytest.mark.parametrize("seed", [-1, 2**32])
def test_a_seed_outside_32_bits_is_refused(models, seed):
    _, model = models("llama32_tied")
    with pytest.raises(ValueError, match=r"seed must be in \[0, 2\*\*32\)"):
        llama_jax.generate(model, np.array([[5, 6, 7]]), max_new_tokens=2, temperature=1.0, seed=seed)

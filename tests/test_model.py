"""The whole model against transformers' LlamaForCausalLM on the same weights, in float32.

Every case: all logits of a long prompt (hundreds of tokens, where RoPE mistakes show), a
left-padded batch of two prompts against their unpadded runs, and 20 greedy tokens against
transformers' generate.
"""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import TINY_CHECKPOINTS, torch_logits

import llama_jax

CASES = [*TINY_CHECKPOINTS, "smollm2"]
TOLERANCE = 1e-3


def random_ids(vocab, length, seed):
    return np.random.default_rng(seed).integers(3, vocab, size=length).astype(np.int32)


@pytest.mark.parametrize("case", CASES)
def test_all_logits_match_transformers(models, case):
    _, ours = models(case)
    reference = models.reference(case)
    ids = random_ids(ours.config.vocab_size, 300, seed=1)[None]
    diff = np.abs(np.asarray(ours(jnp.asarray(ids))) - torch_logits(reference, ids)).max()
    print(f"[{case}] max abs logit diff vs transformers, 300 tokens: {diff:.2e}")
    assert diff <= TOLERANCE


@pytest.mark.parametrize("case", CASES)
def test_left_padded_batch_matches_unpadded_runs(models, case):
    _, ours = models(case)
    reference = models.reference(case)
    prompts = [random_ids(ours.config.vocab_size, n, seed=n) for n in (9, 23)]
    ids, mask = llama_jax.left_pad(prompts, pad_id=0)
    batched = np.asarray(ours(jnp.asarray(ids), jnp.asarray(mask)))
    batched_reference = torch_logits(reference, ids, mask)
    worst = worst_reference = 0.0
    for row, prompt in enumerate(prompts):
        alone = np.asarray(ours(jnp.asarray(prompt[None])))[0]
        real = batched[row, -len(prompt) :]
        worst = max(worst, np.abs(real - alone).max())
        worst_reference = max(worst_reference, np.abs(real - batched_reference[row, -len(prompt) :]).max())
    print(
        f"[{case}] padded vs unpadded max abs diff {worst:.2e}; padded vs transformers padded {worst_reference:.2e}"
    )
    assert worst <= TOLERANCE and worst_reference <= TOLERANCE


@pytest.mark.parametrize("case", CASES)
def test_greedy_20_tokens_match_transformers_generate(models, case):
    directory, ours = models(case)
    reference = models.reference(case)
    if case == "smollm2":
        tokenizer = llama_jax.load_tokenizer(directory)
        prompt = np.asarray(tokenizer("The capital of France is")["input_ids"], np.int32)
    else:
        prompt = random_ids(ours.config.vocab_size, 12, seed=5)
    with torch.no_grad():
        expected = reference.generate(torch.as_tensor(prompt[None]), do_sample=False, max_new_tokens=20)[
            0, len(prompt) :
        ].numpy()
    got = llama_jax.generate(ours, prompt[None], max_new_tokens=20)[0]
    print(f"[{case}] greedy continuation: {got.tolist()}")
    # transformers stops at EOS (shorter output); llama_jax pads the rest of the row with the pad id
    np.testing.assert_array_equal(got[: len(expected)], expected)
    pad_id = ours.config.pad_token_id if ours.config.pad_token_id is not None else ours.config.eos_token_id[0]
    assert (got[len(expected) :] == pad_id).all()
    if case == "smollm2":
        assert "Paris" in tokenizer.decode(got)

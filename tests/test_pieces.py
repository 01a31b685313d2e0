"""RoPE and RMSNorm, piece by piece, against transformers' own modules (float32)."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from transformers.models.llama import modeling_llama

import llama_jax
from llama_jax.model import RMSNorm
from llama_jax.rope import apply_rope, inverse_frequencies, rope_angles


@pytest.mark.parametrize("rope", ["llama3", "default"])
def test_rope_matches_transformers_over_long_positions(rope):
    raw = dict(llama_jax.LLAMA_3_2_1B)
    if rope == "default":
        raw["rope_scaling"] = None
    hf_config = transformers.LlamaConfig(**raw)
    config = llama_jax.LlamaConfig.from_hf(raw)
    rotary = modeling_llama.LlamaRotaryEmbedding(hf_config)
    np.testing.assert_allclose(inverse_frequencies(config), rotary.inv_freq.numpy(), rtol=1e-6)

    positions = np.arange(0, 4000, 7)[None]  # long positions: where a wrong frequency shows
    x = (
        np.random.default_rng(0)
        .standard_normal((1, positions.shape[1], 2, config.head_dim))
        .astype(np.float32)
    )
    cos_t, sin_t = rotary(torch.zeros(1), torch.as_tensor(positions))
    q_t, _ = modeling_llama.apply_rotary_pos_emb(
        torch.as_tensor(x).transpose(1, 2), torch.as_tensor(x).transpose(1, 2), cos_t, sin_t
    )
    cos, sin = rope_angles(jnp.asarray(positions), inverse_frequencies(config))
    ours = np.asarray(apply_rope(jnp.asarray(x), cos, sin))
    diff = np.abs(ours - q_t.transpose(1, 2).numpy()).max()
    print(f"RoPE ({rope}) max abs diff vs transformers up to position 4000: {diff:.2e}")
    assert diff < 1e-3


def test_llama3_scaling_changes_low_frequencies_only():
    config = llama_jax.LlamaConfig.from_hf(llama_jax.LLAMA_3_2_1B)
    scaled = inverse_frequencies(config)
    plain = llama_jax.rope.default_inverse_frequencies(config.head_dim, config.rope_theta)
    assert scaled[0] == plain[0]  # the highest frequency is untouched
    np.testing.assert_allclose(scaled[-1], plain[-1] / 32, rtol=1e-6)  # the lowest is divided by the factor
    assert 10 < int((scaled != plain).sum()) < len(plain)


def test_rmsnorm_matches_transformers():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 5, 64)).astype(np.float32) * 3
    weight = rng.standard_normal(64).astype(np.float32)
    reference = modeling_llama.LlamaRMSNorm(64, eps=1e-5)
    reference.weight.data = torch.as_tensor(weight)
    ours = RMSNorm(64, 1e-5)
    ours.weight[...] = jnp.asarray(weight)
    diff = np.abs(np.asarray(ours(jnp.asarray(x))) - reference(torch.as_tensor(x)).detach().numpy()).max()
    print(f"RMSNorm max abs diff vs transformers: {diff:.2e}")
    assert diff < 1e-5

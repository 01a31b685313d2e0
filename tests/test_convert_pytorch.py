"""A transformers ``state_dict`` in memory → llama_jax (chapter 9a)."""

from __future__ import annotations

import jax.numpy as jnp
import pytest
import torch
from conftest import TOL, max_diff, ours

import llama_jax
from llama_jax import CheckpointError


@pytest.mark.parametrize("name", ["untied", "llama32_tied"])
def test_from_torch_state_dict(reference, name):
    hf_model, hf_logits = reference(name)
    model = llama_jax.convert.from_torch_state_dict(
        hf_model.state_dict(), hf_model.config, dtype=jnp.float32, progress=False
    )
    diff = max_diff(ours(model), hf_logits)
    print(f"{name}: from_torch_state_dict vs transformers max |diff| = {diff:.2e}")
    assert diff <= TOL


def test_from_torch_state_dict_errors(reference):
    hf_model, _ = reference("untied")
    state = dict(hf_model.state_dict())
    del state["model.layers.1.mlp.up_proj.weight"]
    with pytest.raises(
        CheckpointError, match=r"state_dict: missing 1 tensor\(s\): model.layers.1.mlp.up_proj.weight"
    ):
        llama_jax.convert.from_torch_state_dict(state, hf_model.config, progress=False)
    state = dict(hf_model.state_dict(), **{"model.norm.weight": torch.ones(65)})
    with pytest.raises(CheckpointError, match=r"model.norm.weight \(65,\) \(config implies \(64,\)\)"):
        llama_jax.convert.from_torch_state_dict(state, hf_model.config, progress=False)

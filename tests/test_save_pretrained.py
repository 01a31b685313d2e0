"""``llama_jax.save_pretrained``: back to a Hugging Face checkpoint that transformers loads."""

from __future__ import annotations

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
from conftest import IDS, assert_same_weights, max_diff, torch_logits, torch_model

import llama_jax
from llama_jax import CheckpointError
from llama_jax.weights import hf_tensors


@pytest.mark.parametrize("name", ["llama32_tied", "untied"])
def test_save_pretrained_loads_in_transformers(tiny_checkpoints, reference, tmp_path, name):
    model = llama_jax.from_pretrained(tiny_checkpoints[name], dtype=jnp.float32, progress=False)
    out = llama_jax.save_pretrained(model, tmp_path / "export")
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors"]
    modes = {f: os.stat(os.path.join(out, f)).st_mode & 0o777 for f in os.listdir(out)}
    assert set(modes.values()) == {0o644}, modes  # readable by others, as transformers' files are
    exported = torch_logits(torch_model(out), IDS)
    diff = max_diff(exported, reference(name)[1])
    print(f"{name}: transformers on the export vs on the original max |diff| = {diff}")
    np.testing.assert_array_equal(exported, reference(name)[1])
    back = llama_jax.from_pretrained(out, dtype=jnp.float32, progress=False)
    assert back.config == model.config
    assert_same_weights(back, model)


def test_save_pretrained_sharded(tiny_checkpoints, reference, tmp_path):
    model = llama_jax.from_pretrained(tiny_checkpoints["untied"], dtype=jnp.float32, progress=False)
    out = llama_jax.save_pretrained(model, tmp_path / "export", max_shard_size="40KB")
    shards = sorted(f for f in os.listdir(out) if f.endswith(".safetensors"))
    index = json.load(open(os.path.join(out, "model.safetensors.index.json")))
    print(f"{len(shards)} shards of at most 40KB each (a bigger tensor alone in its shard)")
    assert len(shards) > 2 and set(index["weight_map"].values()) == set(shards)
    assert index["weight_map"].keys() == hf_tensors(model).keys()
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in hf_tensors(model).values())
    for shard in shards:  # within the limit (+ the safetensors header), unless one tensor alone is bigger
        alone = list(index["weight_map"].values()).count(shard) == 1
        assert alone or os.path.getsize(os.path.join(out, shard)) <= 40_000 + 4096
    np.testing.assert_array_equal(torch_logits(torch_model(out), IDS), reference("untied")[1])
    assert_same_weights(llama_jax.from_pretrained(out, dtype=jnp.float32, progress=False), model)


def test_save_pretrained_keeps_bfloat16(tiny_checkpoints, tmp_path):
    model = llama_jax.from_pretrained(tiny_checkpoints["llama32_tied"], dtype=jnp.bfloat16, progress=False)
    out = llama_jax.save_pretrained(model, tmp_path / "export")
    assert json.load(open(os.path.join(out, "config.json")))["dtype"] == "bfloat16"
    assert_same_weights(llama_jax.from_pretrained(out, dtype=jnp.bfloat16, progress=False), model)


def test_save_pretrained_never_overwrites_or_leaves_half_a_checkpoint(
    tiny_checkpoints, tmp_path, monkeypatch
):
    model = llama_jax.from_pretrained(tiny_checkpoints["untied"], dtype=jnp.float32, progress=False)
    target = tmp_path / "export"
    target.mkdir()
    (target / "notes.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="already exists and is not empty; pass overwrite=True"):
        llama_jax.save_pretrained(model, target)
    assert os.listdir(target) == ["notes.txt"]
    llama_jax.save_pretrained(model, target, overwrite=True)
    assert sorted(os.listdir(target)) == ["config.json", "model.safetensors"]

    def fail(*args, **kwargs):
        raise KeyboardInterrupt  # interrupted half-way through the export

    monkeypatch.setattr(safetensors.numpy, "save_file", fail)
    with pytest.raises(KeyboardInterrupt):
        llama_jax.save_pretrained(model, tmp_path / "fresh")
    assert sorted(os.listdir(tmp_path)) == ["export"]  # neither the target nor a temporary directory

"""Loading checkpoints: strictness, sharded files, the hub path (with checkpoints we write), clear errors."""

import json
import os
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import llama_jax
from llama_jax import CheckpointError
from llama_jax.weights import expected_tensors, hf_tensors


def copy_checkpoint(src, dst):
    shutil.copytree(src, dst)
    return str(dst)


def rewrite_tensors(directory, change):
    path = os.path.join(directory, "model.safetensors")
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def test_loaded_parameters_are_the_checkpoint_tensors(tiny_checkpoints):
    directory = tiny_checkpoints["untied"]
    model = llama_jax.from_pretrained(directory, dtype=jnp.float32, progress=False)
    stored = load_file(os.path.join(directory, "model.safetensors"))
    ours = hf_tensors(model)
    assert ours.keys() == stored.keys() == expected_tensors(model.config).keys()
    for name, tensor in stored.items():
        np.testing.assert_array_equal(ours[name], tensor, err_msg=name)


def test_sharded_checkpoint_equals_single_file(tiny_checkpoints):
    sharded_dir = tiny_checkpoints["sharded"]
    assert os.path.exists(os.path.join(sharded_dir, "model.safetensors.index.json"))
    assert len([f for f in os.listdir(sharded_dir) if f.endswith(".safetensors")]) > 1
    sharded = llama_jax.from_pretrained(sharded_dir, dtype=jnp.float32, progress=False)
    single = llama_jax.from_pretrained(tiny_checkpoints["untied"], dtype=jnp.float32, progress=False)
    ids = jnp.arange(3, 40)[None]  # the same seed and config: the same weights
    np.testing.assert_array_equal(np.asarray(sharded(ids)), np.asarray(single(ids)))


def test_bfloat16_is_the_default_dtype(tiny_checkpoints):
    model = llama_jax.from_pretrained(tiny_checkpoints["llama32_tied"], progress=False)
    assert model.model.embed_tokens.embedding.get_value().dtype == jnp.bfloat16


def test_missing_tensor_is_named(tiny_checkpoints, tmp_path):
    directory = copy_checkpoint(tiny_checkpoints["untied"], tmp_path / "ckpt")
    rewrite_tensors(directory, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing 1 tensor\(s\): model.layers.1.mlp.up_proj.weight"):
        llama_jax.from_pretrained(directory, progress=False)


def test_unexpected_and_misshaped_tensors_are_named(tiny_checkpoints, tmp_path):
    directory = copy_checkpoint(tiny_checkpoints["untied"], tmp_path / "ckpt")

    def change(tensors):
        tensors["model.layers.0.self_attn.q_proj.bias"] = np.zeros(64, np.float32)
        tensors["model.norm.weight"] = np.ones(65, np.float32)

    rewrite_tensors(directory, change)
    with pytest.raises(CheckpointError) as error:
        llama_jax.from_pretrained(directory, progress=False)
    message = str(error.value)
    assert "unexpected 1 tensor(s): model.layers.0.self_attn.q_proj.bias" in message
    assert "model.norm.weight (65,) (config implies (64,))" in message
    assert "\n" not in message


def test_config_that_disagrees_with_the_weights(tiny_checkpoints, tmp_path):
    directory = copy_checkpoint(tiny_checkpoints["untied"], tmp_path / "ckpt")
    config_path = os.path.join(directory, "config.json")
    config = json.load(open(config_path))
    config["intermediate_size"] = 14336  # the old tutorial's mistake: the 8B's MLP size
    json.dump(config, open(config_path, "w"))
    with pytest.raises(
        CheckpointError, match=r"mlp.down_proj.weight \(64, 128\) \(config implies \(64, 14336\)\)"
    ):
        llama_jax.from_pretrained(directory, progress=False)


def test_tied_checkpoint_may_carry_a_head_copy(tiny_checkpoints, tmp_path):
    """A tied checkpoint that also stores a copy of the embedding as ``lm_head.weight`` loads, with the
    logits transformers gives. (A copy that differs is not covered: transformers 5.25 then unties the
    head and uses the copy, where llama_jax keeps the embedding.)"""
    from conftest import torch_logits, torch_model

    directory = copy_checkpoint(tiny_checkpoints["llama32_tied"], tmp_path / "ckpt")
    rewrite_tensors(directory, lambda t: t.update({"lm_head.weight": t["model.embed_tokens.weight"].copy()}))
    model = llama_jax.from_pretrained(directory, dtype=jnp.float32, progress=False)
    ids = np.arange(3, 40, dtype=np.int32)[None]
    ours = np.asarray(model(jnp.asarray(ids)))
    np.testing.assert_allclose(ours, torch_logits(torch_model(directory), ids), atol=1e-4)
    original = llama_jax.from_pretrained(tiny_checkpoints["llama32_tied"], dtype=jnp.float32, progress=False)
    np.testing.assert_array_equal(ours, np.asarray(original(jnp.asarray(ids))))


def test_no_weight_files(tiny_checkpoints, tmp_path):
    (tmp_path / "config.json").write_text(
        open(os.path.join(tiny_checkpoints["untied"], "config.json")).read()
    )
    with pytest.raises(CheckpointError, match=r"no \*.safetensors weight files"):
        llama_jax.from_pretrained(tmp_path)


def test_corrupt_safetensors_file(tiny_checkpoints, tmp_path):
    directory = copy_checkpoint(tiny_checkpoints["untied"], tmp_path / "ckpt")
    with open(os.path.join(directory, "model.safetensors"), "r+b") as f:
        f.write(b"\xff" * 16)
    with pytest.raises(CheckpointError, match="cannot read .*model.safetensors"):
        llama_jax.from_pretrained(directory)

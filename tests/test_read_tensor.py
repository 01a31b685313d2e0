"""llama_jax.weights.read_tensor: one tensor by its Hugging Face name, from one file, an index's shard,
or whichever of several files holds it; one-line errors naming the tensor and the directory."""

import json
import os

import ml_dtypes
import numpy as np
import pytest
from conftest import make_tiny_checkpoint
from safetensors.numpy import save_file

from llama_jax.weights import CheckpointError, read_tensor


def tensors(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "model.embed_tokens.weight": rng.standard_normal((8, 4)).astype(np.float32),
        "model.layers.0.self_attn.q_proj.weight": rng.standard_normal((4, 4)).astype(np.float32),
        "model.norm.weight": rng.standard_normal(4).astype(ml_dtypes.bfloat16),
    }


def test_single_file(tmp_path):
    stored = tensors()
    save_file(stored, tmp_path / "model.safetensors")
    for name, tensor in stored.items():
        read = read_tensor(str(tmp_path), name)
        assert read.dtype == tensor.dtype and read.shape == tensor.shape, name
        np.testing.assert_array_equal(read, tensor, err_msg=name)


def test_several_files_without_an_index(tmp_path):
    stored = tensors()
    names = list(stored)
    save_file({names[0]: stored[names[0]]}, tmp_path / "a.safetensors")
    save_file({n: stored[n] for n in names[1:]}, tmp_path / "b.safetensors")
    for name, tensor in stored.items():
        np.testing.assert_array_equal(read_tensor(tmp_path, name), tensor, err_msg=name)


def test_the_index_decides_which_shard(tmp_path):
    """The index is followed, not the files' headers: a stale copy in another file is not read."""
    stored, stale = tensors(0), tensors(1)
    name = "model.layers.0.self_attn.q_proj.weight"
    save_file({name: stale[name]}, tmp_path / "model-00001-of-00002.safetensors")
    save_file(stored, tmp_path / "model-00002-of-00002.safetensors")
    weight_map = {n: "model-00002-of-00002.safetensors" for n in stored}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    np.testing.assert_array_equal(read_tensor(tmp_path, name), stored[name])
    assert not np.array_equal(stored[name], stale[name])


def test_sharded_checkpoint_written_by_transformers(tmp_path):
    directory = make_tiny_checkpoint(tmp_path / "sharded", "sharded")
    with open(os.path.join(directory, "model.safetensors.index.json")) as f:
        weight_map = json.load(f)["weight_map"]
    assert len(set(weight_map.values())) > 1
    reference = make_tiny_checkpoint(tmp_path / "untied", "untied")  # same config and seed, one file
    for name in weight_map:
        np.testing.assert_array_equal(
            read_tensor(directory, name), read_tensor(reference, name), err_msg=name
        )


def test_missing_tensor_names_tensor_and_directory(tmp_path):
    save_file(tensors(), tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError) as error:
        read_tensor(tmp_path, "lm_head.weight")
    message = str(error.value)
    assert "lm_head.weight" in message and str(tmp_path) in message and "\n" not in message


def test_missing_tensor_in_an_index(tmp_path):
    save_file(tensors(), tmp_path / "model-00001-of-00001.safetensors")
    weight_map = {n: "model-00001-of-00001.safetensors" for n in tensors()}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(CheckpointError, match=f"no tensor lm_head.weight in {tmp_path}"):
        read_tensor(tmp_path, "lm_head.weight")


def test_shard_named_by_the_index_is_absent(tmp_path):
    weight_map = {"model.norm.weight": "model-00002-of-00002.safetensors"}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(CheckpointError, match="model.norm.weight.*model-00002-of-00002.safetensors"):
        read_tensor(tmp_path, "model.norm.weight")


def test_missing_directory():
    with pytest.raises(CheckpointError, match="model.norm.weight: no checkpoint directory /nonexistent/x"):
        read_tensor("/nonexistent/x", "model.norm.weight")


def test_directory_without_weights(tmp_path):
    with pytest.raises(CheckpointError, match=f"no tensor model.norm.weight in {tmp_path}"):
        read_tensor(tmp_path, "model.norm.weight")


def test_corrupt_file(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json")
    with pytest.raises(CheckpointError) as error:
        read_tensor(tmp_path, "model.norm.weight")
    message = str(error.value)
    assert "model.norm.weight" in message and "model.safetensors" in message and "\n" not in message

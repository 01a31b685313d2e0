"""The loading entry (llama_jax.checkpoints): paths and hub repo ids, the bundled model, the book's choice."""

import os

import huggingface_hub.errors
import jax.numpy as jnp
import pytest

import llama_jax
from llama_jax import CheckpointError


def test_bad_paths(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint directory at /nonexistent"):
        llama_jax.from_pretrained("/nonexistent")
    (tmp_path / "model.gguf").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="is a file"):
        llama_jax.from_pretrained(tmp_path / "model.gguf")
    with pytest.raises(llama_jax.ConfigError, match="no config.json"):
        llama_jax.from_pretrained(tmp_path)


def test_hub_repo_id_goes_through_snapshot_download(tiny_checkpoints, monkeypatch):
    calls = []

    def fake_snapshot_download(repo_id, **kwargs):
        calls.append((repo_id, kwargs))
        return tiny_checkpoints["llama32_tied"]

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    model = llama_jax.from_pretrained("meta-llama/Llama-3.2-1B", dtype=jnp.float32, progress=False)
    assert calls[0][0] == "meta-llama/Llama-3.2-1B"
    assert "*.safetensors" in calls[0][1]["allow_patterns"]
    assert model.config.num_hidden_layers == 2


@pytest.mark.parametrize(
    "error, message",
    [
        (
            huggingface_hub.errors.LocalEntryNotFoundError("Connection error"),
            "could not reach the Hugging Face Hub.*default_checkpoint",
        ),
        (OSError("Name or service not known"), "could not reach the Hugging Face Hub"),
    ],
)
def test_unreachable_hub_points_to_the_default_model(monkeypatch, error, message):
    def fail(repo_id, **kwargs):
        raise error

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fail)
    with pytest.raises(CheckpointError, match=message):
        llama_jax.from_pretrained("meta-llama/Llama-3.2-1B")


def test_default_checkpoint_is_built_once_and_reused(smollm2_dir):
    assert llama_jax.default_checkpoint() == smollm2_dir
    files = set(os.listdir(smollm2_dir))
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= files
    assert not [
        f for f in os.listdir(os.path.dirname(smollm2_dir)) if f.startswith(".SmolLM2")
    ]  # no leftovers


def test_selected_checkpoint_follows_the_environment(tiny_checkpoints, smollm2_dir, monkeypatch):
    monkeypatch.delenv("LLAMA_JAX_MODEL", raising=False)
    assert llama_jax.selected_checkpoint() == smollm2_dir
    monkeypatch.setenv("LLAMA_JAX_MODEL", tiny_checkpoints["untied"])
    assert llama_jax.selected_checkpoint() == tiny_checkpoints["untied"]

"""Keras Hub ``Llama3CausalLM``/``Llama3Backbone`` → llama_jax (chapter 8): against keras-hub's own forward pass, float32."""

from __future__ import annotations

import dataclasses
import json
import os

os.environ.setdefault("KERAS_BACKEND", "jax")

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import IDS, TOL, math_fields, max_diff, ours

import llama_jax
from llama_jax import CheckpointError, ConfigError


@pytest.fixture(scope="session")
def keras_hub():
    import keras_hub

    return keras_hub


def keras_logits(backbone, ids) -> np.ndarray:
    """Keras Hub's own forward: the backbone's hidden states through its (reverse) embedding."""
    hidden = backbone({"token_ids": np.asarray(ids, "int32"), "padding_mask": np.ones(ids.shape, "int32")})
    return np.asarray(backbone.token_embedding(hidden, reverse=True))


def keras_backbone(keras_hub, directory, **kwargs):
    return keras_hub.models.Llama3Backbone.from_preset(directory, dtype="float32", **kwargs)


@pytest.mark.parametrize("name", ["llama32_tied", "untied", "multi_head"])
def test_keras_hub_tiny_equals_keras_forward(keras_hub, tiny_checkpoints, reference, name):
    # head_dim_32 is left out: Keras Hub's Llama always uses hidden/heads and cannot read it.
    directory = tiny_checkpoints[name]
    kwargs = llama_jax.convert.keras_backbone_kwargs(llama_jax.LlamaConfig.from_hf(directory))
    backbone = keras_backbone(keras_hub, directory, **kwargs)
    model = llama_jax.convert.from_keras_hub(
        backbone, dtype=jnp.float32, checkpoint=directory, progress=False
    )
    diff = max_diff(ours(model, IDS), keras_logits(backbone, IDS))
    print(f"{name}: llama_jax vs keras-hub max |diff| = {diff:.2e}")
    assert diff <= TOL
    assert model.config.tie_word_embeddings == (name == "llama32_tied")
    assert (
        model.config.rms_norm_eps == 1e-5 and model.config.num_key_value_heads == backbone.num_key_value_heads
    )
    diff = max_diff(ours(model, IDS), reference(name)[1])  # with the right arguments, all three agree
    print(f"{name}: llama_jax (from keras-hub) vs transformers max |diff| = {diff:.2e}")
    assert diff <= TOL


def test_keras_hub_importer_traps_are_caught(keras_hub, tiny_checkpoints, reference):
    """keras-hub 0.32 ignores rms_norm_eps and the llama3 scaling of a transformers 5 config; both give
    wrong logits silently, and from_keras_hub(checkpoint=...) refuses either."""
    directory = tiny_checkpoints["llama32_tied"]  # saved by transformers 5: rope_parameters
    assert "rope_parameters" in json.load(open(os.path.join(directory, "config.json")))
    config = llama_jax.LlamaConfig.from_hf(directory)
    as_loaded = keras_backbone(keras_hub, directory)
    assert as_loaded.get_config()["layer_norm_epsilon"] == 1e-6
    assert as_loaded.get_config()["rope_frequency_adjustment_factor"] is None  # the scaling is dropped
    eps_only = keras_backbone(keras_hub, directory, layer_norm_epsilon=config.rms_norm_eps)
    diff = max_diff(keras_logits(eps_only, IDS), reference("llama32_tied")[1])
    print(f"keras-hub with the right epsilon but no RoPE scaling vs transformers: max |diff| = {diff:.2f}")
    assert diff > 100 * TOL
    for backbone, field in ((as_loaded, "rms_norm_eps"), (eps_only, "rope_scaling")):
        with pytest.raises(
            ConfigError, match=rf"Keras Hub Llama3Backbone has {field}=.* but its checkpoint has"
        ):
            llama_jax.convert.from_keras_hub(backbone, checkpoint=directory, progress=False)
    # without a checkpoint to compare with, the converter is faithful to the (wrong) Keras model
    model = llama_jax.convert.from_keras_hub(eps_only, dtype=jnp.float32, progress=False)
    assert model.config.rope_scaling is None
    assert max_diff(ours(model, IDS), keras_logits(eps_only, IDS)) <= TOL
    # an epsilon that went through float32 (as GGUF stores it) is the same epsilon
    rounded = {
        **llama_jax.convert.keras_backbone_kwargs(config),
        "layer_norm_epsilon": float(np.float32(1e-5)),
    }
    assert rounded["layer_norm_epsilon"] != config.rms_norm_eps
    llama_jax.convert.from_keras_hub(
        keras_backbone(keras_hub, directory, **rounded), checkpoint=directory, progress=False
    )


def test_save_pretrained_writes_legacy_rope_keys_that_keras_hub_reads(keras_hub, tiny_checkpoints, tmp_path):
    """transformers 4.x and keras-hub read rope_theta + rope_scaling; save_pretrained keeps writing those."""
    model = llama_jax.from_pretrained(tiny_checkpoints["llama32_tied"], dtype=jnp.float32, progress=False)
    saved = llama_jax.save_pretrained(model, tmp_path / "saved")
    raw = json.load(open(os.path.join(saved, "config.json")))
    assert "rope_parameters" not in raw and raw["rope_theta"] == 500000.0
    assert raw["rope_scaling"] == {"rope_type": "llama3", **dataclasses.asdict(model.config.rope_scaling)}
    backbone = keras_backbone(keras_hub, saved, layer_norm_epsilon=1e-5)
    assert backbone.get_config()["rope_frequency_adjustment_factor"] == model.config.rope_scaling.factor
    converted = llama_jax.convert.from_keras_hub(
        backbone, dtype=jnp.float32, checkpoint=saved, progress=False
    )
    assert max_diff(ours(converted), ours(model)) <= TOL


def test_keras_hub_bundled_model(keras_hub, smollm2_dir):
    # Keras Hub's importer ignores rms_norm_eps (1e-6); the backbone takes the right one as an argument.
    eps = json.load(open(os.path.join(smollm2_dir, "config.json")))["rms_norm_eps"]
    backbone = keras_hub.models.Llama3Backbone.from_preset(
        smollm2_dir, dtype="float32", layer_norm_epsilon=eps
    )
    causal_lm = keras_hub.models.Llama3CausalLM.from_preset(smollm2_dir, backbone=backbone)
    model = llama_jax.convert.from_keras_hub(causal_lm, dtype=jnp.float32, progress=False)
    ids = np.random.RandomState(1).randint(0, model.config.vocab_size, (1, 64))
    reference = np.asarray(
        causal_lm({"token_ids": ids.astype("int32"), "padding_mask": np.ones_like(ids, "int32")})
    )
    diff = max_diff(ours(model, ids), reference)
    print(f"bundled model: llama_jax vs keras-hub max |diff| = {diff:.2e}")
    assert diff <= TOL
    hf_config = llama_jax.LlamaConfig.from_hf(smollm2_dir)
    assert math_fields(model.config) == math_fields(hf_config)
    assert model.config.bos_token_id == hf_config.bos_token_id  # from the Keras tokenizer


@pytest.mark.filterwarnings("ignore:Layer InputLayer does not have a `quantize` method")
def test_keras_hub_quantized_model_is_refused(keras_hub):
    backbone = keras_hub.models.Llama3Backbone(
        vocabulary_size=64,
        num_layers=1,
        num_query_heads=4,
        hidden_dim=32,
        intermediate_dim=64,
        num_key_value_heads=2,
    )
    backbone.quantize("int8")  # adds kernel_scale variables this converter does not know
    with pytest.raises(CheckpointError, match=r"unexpected \d+ tensor\(s\): .*kernel_scale"):
        llama_jax.convert.from_keras_hub(backbone, progress=False)

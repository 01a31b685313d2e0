"""LlamaConfig.from_hf: every field Llama 3.x / SmolLM2 configs use, both RoPE spellings, clear errors."""

import json

import pytest
import transformers

import llama_jax
from llama_jax import ConfigError, LlamaConfig, RopeScaling


def test_llama_3_2_1b_config():
    config = LlamaConfig.from_hf(llama_jax.LLAMA_3_2_1B)
    assert (config.hidden_size, config.num_hidden_layers, config.intermediate_size) == (2048, 16, 8192)
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (32, 8, 64)
    assert config.num_query_groups == 4
    assert config.rope_theta == 500000.0
    assert config.rope_scaling == RopeScaling(32.0, 1.0, 4.0, 8192)
    assert config.tie_word_embeddings and config.vocab_size == 128256
    assert (config.bos_token_id, config.eos_token_id) == (128000, (128001,))


def test_transformers5_rope_parameters_spelling():
    raw = {k: v for k, v in llama_jax.LLAMA_3_2_1B.items() if k not in ("rope_theta", "rope_scaling")}
    raw["rope_parameters"] = {**llama_jax.LLAMA_3_2_1B["rope_scaling"], "rope_theta": 500000.0}
    assert LlamaConfig.from_hf(raw) == LlamaConfig.from_hf(llama_jax.LLAMA_3_2_1B)


def test_default_model_config(smollm2_dir):
    config = LlamaConfig.from_hf(smollm2_dir)
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (576, 30, 9)
    assert (config.num_key_value_heads, config.head_dim, config.intermediate_size) == (3, 64, 1536)
    assert config.rope_theta == 100000.0 and config.rope_scaling is None
    assert config.tie_word_embeddings and config.vocab_size == 49152
    assert abs(config.rms_norm_eps - 1e-5) < 1e-9


def test_explicit_head_dim_and_multi_eos():
    raw = {**llama_jax.LLAMA_3_2_1B, "head_dim": 128, "eos_token_id": [128001, 128008, 128009]}
    config = LlamaConfig.from_hf(raw)
    assert config.head_dim == 128 and config.eos_token_id == (128001, 128008, 128009)
    no_head_dim = {k: v for k, v in llama_jax.LLAMA_3_2_1B.items() if k != "head_dim"}
    assert LlamaConfig.from_hf(no_head_dim).head_dim == 2048 // 32


def test_to_hf_round_trip_and_transformers_accepts_it(tmp_path):
    config = LlamaConfig.from_hf(llama_jax.LLAMA_3_2_1B)
    assert LlamaConfig.from_hf(config.to_hf()) == config
    (tmp_path / "config.json").write_text(json.dumps(config.to_hf()))
    reloaded = transformers.AutoConfig.from_pretrained(tmp_path)
    assert LlamaConfig.from_hf(reloaded.to_dict()) == config


@pytest.mark.parametrize(
    "change, message",
    [
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_scaling.rope_type='yarn'"),
        (
            {"rope_scaling": None, "rope_parameters": {"rope_type": "dynamic", "rope_theta": 1e4}},
            "rope_parameters.rope_type='dynamic'",
        ),
        ({"attention_bias": True}, "attention_bias=True"),
        ({"mlp_bias": True}, "mlp_bias=True"),
        ({"model_type": "mistral"}, "model_type='mistral'"),
        ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
        ({"hidden_size": None}, "'hidden_size' is missing"),
        ({"num_key_value_heads": 5}, "not a multiple"),
        ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "needs 'low_freq_factor'"),
    ],
)
def test_unsupported_values_name_the_field(change, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        LlamaConfig.from_hf({**llama_jax.LLAMA_3_2_1B, **change})


def test_missing_or_broken_config_file(tmp_path):
    with pytest.raises(ConfigError, match="no config.json"):
        LlamaConfig.from_hf(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        LlamaConfig.from_hf(tmp_path)

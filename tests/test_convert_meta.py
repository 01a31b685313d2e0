"""Meta's original ``consolidated.00.pth`` + ``params.json`` ↔ llama_jax (chapter 9a): against transformers, float32."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import torch
from conftest import TOL, assert_same_weights, math_fields, max_diff, ours

import llama_jax
from llama_jax import CheckpointError, ConfigError, RopeScaling
from llama_jax.convert import meta as meta_module
from llama_jax.convert.meta import meta_ffn_params, meta_intermediate_size
from llama_jax.weights import hf_tensors


def transformers_meta_to_hf(w: torch.Tensor, heads: int) -> torch.Tensor:
    """transformers' conversion script's permutation (Meta -> Hugging Face), as published."""
    dim1, dim2 = w.shape
    return w.view(heads, dim1 // heads // 2, 2, dim2).transpose(1, 2).reshape(dim1, dim2)


def write_meta_checkpoint(hf_dir: str, out, ffn_dim_multiplier: float, multiple_of: int) -> str:
    """Meta's format written from a Hugging Face checkpoint by the test itself (independently of
    ``to_meta``): rename, and permute q/k rows into Meta's interleaved order."""
    config = json.load(open(os.path.join(hf_dir, "config.json")))
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    hf = {
        k: torch.from_numpy(v)
        for k, v in safetensors.numpy.load_file(os.path.join(hf_dir, "model.safetensors")).items()
    }

    def interleave(w, n):  # the inverse of transformers_meta_to_hf
        dim1, dim2 = w.shape
        meta = w.view(n, 2, dim1 // n // 2, dim2).transpose(1, 2).reshape(dim1, dim2)
        assert torch.equal(transformers_meta_to_hf(meta, n), w)
        return meta

    state = {
        "tok_embeddings.weight": hf["model.embed_tokens.weight"],
        "norm.weight": hf["model.norm.weight"],
        "output.weight": hf.get("lm_head.weight", hf["model.embed_tokens.weight"]),
    }
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        state |= {
            f"layers.{i}.attention.wq.weight": interleave(hf[p + "self_attn.q_proj.weight"], heads),
            f"layers.{i}.attention.wk.weight": interleave(hf[p + "self_attn.k_proj.weight"], kv_heads),
            f"layers.{i}.attention.wv.weight": hf[p + "self_attn.v_proj.weight"],
            f"layers.{i}.attention.wo.weight": hf[p + "self_attn.o_proj.weight"],
            f"layers.{i}.feed_forward.w1.weight": hf[p + "mlp.gate_proj.weight"],
            f"layers.{i}.feed_forward.w2.weight": hf[p + "mlp.down_proj.weight"],
            f"layers.{i}.feed_forward.w3.weight": hf[p + "mlp.up_proj.weight"],
            f"layers.{i}.attention_norm.weight": hf[p + "input_layernorm.weight"],
            f"layers.{i}.ffn_norm.weight": hf[p + "post_attention_layernorm.weight"],
        }
    rope = config["rope_parameters"]
    params = {
        "dim": config["hidden_size"],
        "n_layers": config["num_hidden_layers"],
        "n_heads": heads,
        "n_kv_heads": kv_heads,
        "vocab_size": config["vocab_size"],
        "ffn_dim_multiplier": ffn_dim_multiplier,
        "multiple_of": multiple_of,
        "norm_eps": config["rms_norm_eps"],
        "rope_theta": rope["rope_theta"],
        "use_scaled_rope": rope["rope_type"] == "llama3",
    }
    os.makedirs(out, exist_ok=True)
    torch.save(state, os.path.join(out, "consolidated.00.pth"))
    json.dump(params, open(os.path.join(out, "params.json"), "w"))
    return str(out)


# Meta's FFN formula for the tiny models: int(8 * 64 / 3) = 170, int(0.75 * 170) = 127, rounded up to 128.
TINY_FFN = dict(ffn_dim_multiplier=0.75, multiple_of=128)


@pytest.fixture(scope="session")
def meta_dirs(tiny_checkpoints, meta_like_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("meta")
    return {
        "untied": write_meta_checkpoint(tiny_checkpoints["untied"], root / "untied", **TINY_FFN),
        "meta_like": write_meta_checkpoint(meta_like_dir, root / "meta_like", **TINY_FFN),
    }


def test_meta_ffn_formula():
    # Meta's published params.json files: Llama 3.2 1B (dim 2048, x1.5, 256) and Llama 3.1 8B (4096, x1.3, 1024)
    assert meta_intermediate_size(2048, 1.5, 256) == 8192
    assert meta_intermediate_size(4096, 1.3, 1024) == 14336
    assert meta_ffn_params(2048, 8192) == (1.5, 256)
    for dim, size in [(64, 128), (576, 1536), (4096, 14336), (3072, 8192), (100, 300)]:
        multiplier, multiple_of = meta_ffn_params(dim, size)
        assert meta_intermediate_size(dim, multiplier, multiple_of) == size


@pytest.mark.parametrize("name, factor", [("untied", None), ("meta_like", 8.0)])
def test_from_meta_equals_transformers(meta_dirs, reference, name, factor):
    model = llama_jax.convert.from_meta(
        meta_dirs[name], dtype=jnp.float32, rope_scaling_factor=factor, progress=False
    )
    diff = max_diff(ours(model), reference(name)[1])
    print(f"{name}: from_meta vs transformers max |diff| = {diff:.2e}")
    assert diff <= TOL
    assert model.config.tie_word_embeddings == (name == "meta_like")  # output.weight == tok_embeddings.weight


# Meta's published params.json of Llama 3.1 8B (the file says use_scaled_rope, not the factor 8).
LLAMA_3_1_8B_PARAMS = {
    "dim": 4096,
    "n_layers": 32,
    "n_heads": 32,
    "n_kv_heads": 8,
    "vocab_size": 128256,
    "ffn_dim_multiplier": 1.3,
    "multiple_of": 1024,
    "norm_eps": 1e-05,
    "rope_theta": 500000.0,
    "use_scaled_rope": True,
}


def test_meta_config_of_llama_3_1_needs_its_factor():
    with pytest.raises(ConfigError, match="8 for Llama 3.1, 32 for Llama 3.2"):
        meta_module.meta_config(LLAMA_3_1_8B_PARAMS, tie_word_embeddings=False)
    config = meta_module.meta_config(LLAMA_3_1_8B_PARAMS, tie_word_embeddings=False, rope_scaling_factor=8)
    assert config.rope_scaling == RopeScaling(factor=8.0)
    assert (config.intermediate_size, config.head_dim, config.num_key_value_heads) == (14336, 128, 8)
    hf = dataclasses.replace(config, bos_token_id=128000, eos_token_id=(128001, 128008, 128009))
    from_hf = meta_module.meta_config(LLAMA_3_1_8B_PARAMS, tie_word_embeddings=False, hf_config=hf)
    assert from_hf == hf


def test_from_meta_requires_the_rope_factor(meta_dirs, meta_like_dir, reference):
    """params.json says only use_scaled_rope: with no factor given, from_meta refuses to guess."""
    directory = meta_dirs["meta_like"]  # Llama 3.1-like: llama3 RoPE with factor 8
    with pytest.raises(ConfigError, match="no RoPE scaling factor") as error:
        llama_jax.convert.from_meta(directory, dtype=jnp.float32, progress=False)
    print(error.value)
    assert "\n" not in str(error.value)

    # Given as an argument, or read from the model's Hugging Face config: the same, right model.
    expected = reference("meta_like")[1]
    by_argument = llama_jax.convert.from_meta(
        directory, dtype=jnp.float32, rope_scaling_factor=8, progress=False
    )
    by_config = llama_jax.convert.from_meta(
        directory, dtype=jnp.float32, hf_config=meta_like_dir, progress=False
    )
    assert by_argument.config.rope_scaling == by_config.config.rope_scaling == RopeScaling(factor=8.0)
    assert max_diff(ours(by_argument), expected) <= TOL
    assert np.array_equal(ours(by_config), ours(by_argument))
    hf_config = llama_jax.LlamaConfig.from_hf(meta_like_dir)
    assert by_config.config.max_position_embeddings == hf_config.max_position_embeddings
    assert by_config.config.eos_token_id == hf_config.eos_token_id

    # Llama 3.2's factor on a 3.1-like model loads without complaint and is wrong: why there is no default.
    wrong = llama_jax.convert.from_meta(directory, dtype=jnp.float32, rope_scaling_factor=32, progress=False)
    diff = max_diff(ours(wrong), expected)
    print(f"factor 32 instead of 8: max |diff| = {diff:.2e}")
    assert diff > 10 * TOL  # the low frequencies barely turn in 300 positions, yet it shows


def test_from_meta_refuses_a_hf_config_of_another_model(meta_dirs, meta_like_dir):
    directory = meta_dirs["meta_like"]
    with pytest.raises(ConfigError, match="contradicts the Hugging Face config's factor 8.0"):
        llama_jax.convert.from_meta(
            directory, rope_scaling_factor=32, hf_config=meta_like_dir, progress=False
        )
    other = llama_jax.LlamaConfig.from_hf(meta_like_dir)
    for field, value in [("num_hidden_layers", 3), ("rope_theta", 10000.0), ("vocab_size", 128)]:
        with pytest.raises(ConfigError, match=f"{field}=") as error:
            llama_jax.convert.from_meta(
                directory, hf_config=dataclasses.replace(other, **{field: value}), progress=False
            )
        print(error.value)
    plain = dataclasses.replace(other, rope_scaling=None)
    with pytest.raises(ConfigError, match="scaled RoPE=True"):
        llama_jax.convert.from_meta(directory, hf_config=plain, progress=False)
    odd = dataclasses.replace(other, rope_scaling=RopeScaling(factor=8.0, high_freq_factor=2.0))
    with pytest.raises(ConfigError, match="Meta's fixed values"):
        llama_jax.convert.from_meta(directory, hf_config=odd, progress=False)


def test_meta_qk_permutation(meta_dirs, reference, monkeypatch):
    directory = meta_dirs["untied"]
    hf_model, hf_logits = reference("untied")
    model = llama_jax.convert.from_meta(directory, dtype=jnp.float32, progress=False)
    np.testing.assert_array_equal(
        hf_tensors(model)["model.layers.0.self_attn.q_proj.weight"],
        hf_model.model.layers[0].self_attn.q_proj.weight.detach().numpy(),
    )
    raw = torch.load(os.path.join(directory, "consolidated.00.pth"))["layers.0.attention.wq.weight"].numpy()
    assert not np.array_equal(raw, hf_model.model.layers[0].self_attn.q_proj.weight.detach().numpy())

    monkeypatch.setattr(meta_module, "meta_to_hf_rows", lambda w, heads: w)  # forget the un-permute
    wrong = llama_jax.convert.from_meta(directory, dtype=jnp.float32, progress=False)
    diff = max_diff(ours(wrong), hf_logits)
    print(f"without the q/k un-permute: max |diff| = {diff:.2f}")
    assert diff > 0.1


@pytest.mark.parametrize("name, factor", [("untied", None), ("meta_like", 8.0)])
def test_to_meta_round_trip_is_exact(tiny_checkpoints, meta_like_dir, tmp_path, name, factor):
    directory = {**tiny_checkpoints, "meta_like": meta_like_dir}[name]
    original = llama_jax.from_pretrained(directory, dtype=jnp.float32, progress=False)
    llama_jax.convert.to_meta(original, tmp_path / "meta")
    assert sorted(os.listdir(tmp_path / "meta")) == ["consolidated.00.pth", "params.json"]
    params = json.load(open(tmp_path / "meta" / "params.json"))
    assert meta_intermediate_size(params["dim"], params["ffn_dim_multiplier"], params["multiple_of"]) == 128
    state = torch.load(tmp_path / "meta" / "consolidated.00.pth", weights_only=True)
    assert "output.weight" in state and "layers.1.feed_forward.w2.weight" in state
    back = llama_jax.convert.from_meta(
        tmp_path / "meta", dtype=jnp.float32, rope_scaling_factor=factor, progress=False
    )
    assert math_fields(back.config) == math_fields(original.config)
    assert_same_weights(back, original)


def test_to_meta_refuses_what_params_json_cannot_say(tiny_checkpoints, tmp_path):
    odd_rope = llama_jax.from_pretrained(tiny_checkpoints["llama32_tied"], dtype=jnp.float32, progress=False)
    with pytest.raises(ConfigError, match="original_max_position_embeddings"):
        llama_jax.convert.to_meta(odd_rope, tmp_path / "a")
    wide_heads = llama_jax.from_pretrained(tiny_checkpoints["head_dim_32"], dtype=jnp.float32, progress=False)
    with pytest.raises(ConfigError, match="head_dim=32"):
        llama_jax.convert.to_meta(wide_heads, tmp_path / "b")


def test_from_meta_errors(meta_dirs, tmp_path):
    with pytest.raises(CheckpointError, match="no params.json"):
        llama_jax.convert.from_meta(tmp_path)
    directory = shutil.copytree(meta_dirs["untied"], tmp_path / "extra")
    path = os.path.join(directory, "consolidated.00.pth")
    state = torch.load(path)
    state["layers.0.attention.wq.bias"] = torch.zeros(64)
    del state["layers.1.ffn_norm.weight"]
    torch.save(state, path)
    with pytest.raises(CheckpointError) as error:
        llama_jax.convert.from_meta(directory, progress=False)
    message = str(error.value)
    print(message)
    assert "missing 1 tensor(s): model.layers.1.post_attention_layernorm.weight" in message
    assert "unexpected 1 tensor(s): layers.0.attention.wq.bias" in message
    params = json.load(open(os.path.join(directory, "params.json")))
    json.dump({**params, "quantization_args": {}}, open(os.path.join(directory, "params.json"), "w"))
    with pytest.raises(ConfigError, match="quantization_args"):
        llama_jax.convert.from_meta(directory)

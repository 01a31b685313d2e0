"""Converters (Keras Hub, Meta's checkpoint, GGUF, a state_dict in memory) and the exporter back to
Hugging Face: each checked against the other library's own forward pass (float32), and for strictness."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil

os.environ.setdefault("KERAS_BACKEND", "jax")

import gguf
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import torch
import transformers
from conftest import BASE, torch_logits, torch_model

import llama_jax
from llama_jax import CheckpointError, ConfigError, RopeScaling
from llama_jax.convert import meta as meta_module
from llama_jax.convert.meta import meta_ffn_params, meta_intermediate_size
from llama_jax.rope import default_inverse_frequencies, llama3_scale_frequencies
from llama_jax.weights import hf_tensors

TOL = 1e-3
IDS = np.random.RandomState(0).randint(3, 256, (2, 300))  # a few hundred positions: RoPE errors show
# Meta's own llama3 RoPE values (only the factor is not fixed by Meta's code)
META_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}


def max_diff(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32))))


def math_fields(config: llama_jax.LlamaConfig) -> llama_jax.LlamaConfig:
    """The config without the fields that do not change the logits (special tokens, context length),
    and with the epsilon rounded to float32 (GGUF stores it so: 1e-5 reads back as 9.99999975e-06)."""
    return dataclasses.replace(
        config,
        bos_token_id=None,
        eos_token_id=(),
        pad_token_id=None,
        max_position_embeddings=0,
        rms_norm_eps=float(np.float32(config.rms_norm_eps)),
    )


def assert_same_weights(a, b):
    ta, tb = hf_tensors(a), hf_tensors(b)
    assert ta.keys() == tb.keys()
    for name in ta:
        np.testing.assert_array_equal(ta[name], tb[name], err_msg=name)


@pytest.fixture(scope="session")
def meta_like_dir(tmp_path_factory) -> str:
    """A tiny tied Hugging Face checkpoint whose RoPE is one Meta's params.json can express (llama3 with
    Meta's fixed values, factor 8 as for Llama 3.1), written by transformers like conftest's."""
    directory = tmp_path_factory.mktemp("meta_like")
    config = transformers.LlamaConfig(
        **{
            **BASE,
            "tie_word_embeddings": True,
            "rope_parameters": META_ROPE,
            "max_position_embeddings": 131072,
        }
    )
    torch.manual_seed(1)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.add_(0.1 * torch.randn_like(param))
    model.save_pretrained(directory)
    return str(directory)


@pytest.fixture(scope="session")
def reference(tiny_checkpoints, meta_like_dir):
    """name -> (transformers model, its logits on IDS), computed once."""
    dirs = {**tiny_checkpoints, "meta_like": meta_like_dir}
    cache = {}

    def get(name):
        if name not in cache:
            model = torch_model(dirs[name])
            cache[name] = (model, torch_logits(model, IDS))
        return cache[name]

    return get


def ours(model, ids=IDS) -> np.ndarray:
    return np.asarray(model(jnp.asarray(ids)))


# ---------------------------------------------------------------------------------------------------
# Keras Hub


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


# ---------------------------------------------------------------------------------------------------
# Meta's original format


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


# ---------------------------------------------------------------------------------------------------
# GGUF


@pytest.fixture(scope="session")
def bundled_gguf():
    return llama_jax.checkpoints.bundled_gguf_path()


@pytest.fixture(scope="session")
def transformers_gguf_model(bundled_gguf):
    directory, name = os.path.split(bundled_gguf)
    return transformers.LlamaForCausalLM.from_pretrained(
        directory, gguf_file=name, dtype=torch.float32
    ).eval()


def test_from_gguf_bundled_equals_transformers_gguf_load(bundled_gguf, transformers_gguf_model, smollm2_dir):
    model = llama_jax.convert.from_gguf(bundled_gguf, dtype=jnp.float32, progress=False)
    text = " ".join(
        ["Rotary position embeddings turn each query and key by an angle that grows with position."] * 16
    )
    ids = np.asarray(llama_jax.load_tokenizer(smollm2_dir)(text)["input_ids"])[None]
    assert ids.shape[1] > 200
    diff = max_diff(ours(model, ids), torch_logits(transformers_gguf_model, ids))
    print(f"bundled Q4_1 GGUF: from_gguf vs transformers' GGUF load max |diff| = {diff:.2e}")
    assert diff <= TOL
    # the same dequantized numbers, and the q/k rows in Hugging Face's order
    theirs = transformers_gguf_model.state_dict()
    for name, tensor in hf_tensors(model).items():
        np.testing.assert_array_equal(tensor, theirs[name].numpy(), err_msg=name)
    assert math_fields(model.config) == math_fields(llama_jax.LlamaConfig.from_hf(smollm2_dir))


def write_gguf(hf_dir: str, path, rope_freqs: np.ndarray | None = None, extra: dict | None = None) -> str:
    """A float32 GGUF file written by the test with gguf's own writer: llama.* metadata, GGUF names,
    q/k rows in Meta's interleaved order (as llama.cpp's converter writes them)."""
    config = llama_jax.LlamaConfig.from_hf(hf_dir)
    hf = safetensors.numpy.load_file(os.path.join(hf_dir, "model.safetensors"))
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_key_length(config.head_dim)
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)

    def interleave(w, n):  # Hugging Face -> Meta, as llama.cpp's converter permutes
        return w.reshape(n, 2, w.shape[0] // n // 2, w.shape[1]).swapaxes(1, 2).reshape(w.shape)

    names = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
    }
    layer = {
        "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
        "input_layernorm": "attn_norm",
        "post_attention_layernorm": "ffn_norm",
    }
    for name, tensor in {**hf, **(extra or {})}.items():
        if name.startswith("model.layers."):
            _, _, i, rest = name.split(".", 3)
            module, suffix = rest.rsplit(".", 1)
            gguf_name = f"blk.{i}.{layer[module]}.{suffix}"
        else:
            gguf_name = names.get(name, name)
        if name.endswith("q_proj.weight"):
            tensor = interleave(tensor, config.num_attention_heads)
        elif name.endswith("k_proj.weight"):
            tensor = interleave(tensor, config.num_key_value_heads)
        writer.add_tensor(gguf_name, np.ascontiguousarray(tensor, np.float32))
    if rope_freqs is not None:
        writer.add_tensor("rope_freqs.weight", rope_freqs.astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return str(path)


def llama3_rope_freqs(config: llama_jax.LlamaConfig) -> np.ndarray:
    """What llama.cpp stores in rope_freqs.weight: each frequency's divisor under llama3 scaling."""
    inv_freq = default_inverse_frequencies(config.head_dim, config.rope_theta)
    return inv_freq / llama3_scale_frequencies(inv_freq, config.rope_scaling)


@pytest.mark.parametrize("name", ["untied", "meta_like"])
def test_tiny_gguf_round_trip(tiny_checkpoints, meta_like_dir, reference, tmp_path, name):
    directory = {**tiny_checkpoints, "meta_like": meta_like_dir}[name]
    original = llama_jax.from_pretrained(directory, dtype=jnp.float32, progress=False)
    freqs = llama3_rope_freqs(original.config) if original.config.rope_scaling else None
    model = llama_jax.convert.from_gguf(
        write_gguf(directory, tmp_path / "tiny.gguf", freqs), dtype=jnp.float32, progress=False
    )
    # llama3 scaling recovered from rope_freqs
    assert math_fields(model.config) == math_fields(original.config)
    assert_same_weights(model, original)
    diff = max_diff(ours(model), reference(name)[1])
    print(f"{name}: tiny GGUF vs transformers max |diff| = {diff:.2e}")
    assert diff <= TOL


def test_gguf_rope_freqs_that_are_not_metas_values(tiny_checkpoints, tmp_path):
    directory = tiny_checkpoints["llama32_tied"]  # llama3 scaling with original context 64, not 8192
    original = llama_jax.from_pretrained(directory, dtype=jnp.float32, progress=False)
    path = write_gguf(directory, tmp_path / "tiny.gguf", llama3_rope_freqs(original.config))
    with pytest.raises(ConfigError, match="rope_freqs.weight does not match"):
        llama_jax.convert.from_gguf(path, progress=False)
    model = llama_jax.convert.from_gguf(
        path, dtype=jnp.float32, rope_scaling=original.config.rope_scaling, progress=False
    )
    assert_same_weights(model, original)


def test_gguf_errors(tiny_checkpoints, tmp_path):
    directory = tiny_checkpoints["untied"]
    extra = {"model.layers.0.self_attn.q_proj.bias": np.zeros(64, np.float32)}
    with pytest.raises(CheckpointError, match=r"unexpected 1 tensor\(s\): blk.0.attn_q.bias"):
        llama_jax.convert.from_gguf(
            write_gguf(directory, tmp_path / "extra.gguf", extra=extra), progress=False
        )
    (tmp_path / "bad.gguf").write_bytes(b"GGML" + b"\0" * 64)
    with pytest.raises(CheckpointError, match="cannot read .*bad.gguf as GGUF"):
        llama_jax.convert.from_gguf(tmp_path / "bad.gguf")
    with pytest.raises(CheckpointError, match="no GGUF file"):
        llama_jax.convert.from_gguf(tmp_path / "absent.gguf")


# ---------------------------------------------------------------------------------------------------
# A state_dict in memory


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


# ---------------------------------------------------------------------------------------------------
# Back to Hugging Face


@pytest.mark.parametrize("name", ["llama32_tied", "untied"])
def test_save_pretrained_loads_in_transformers(tiny_checkpoints, reference, tmp_path, name):
    model = llama_jax.from_pretrained(tiny_checkpoints[name], dtype=jnp.float32, progress=False)
    out = llama_jax.save_pretrained(model, tmp_path / "export")
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors"]
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

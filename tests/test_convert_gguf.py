"""GGUF files → llama_jax (chapter 9b): the bundled SmolLM2 against transformers' GGUF loader, tiny files we write."""

from __future__ import annotations

import os

import gguf
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import torch
import transformers
from conftest import TOL, assert_same_weights, math_fields, max_diff, ours, torch_logits

import llama_jax
from llama_jax import CheckpointError, ConfigError
from llama_jax.rope import default_inverse_frequencies, llama3_scale_frequencies
from llama_jax.weights import hf_tensors


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


def write_gguf(
    hf_dir: str,
    path,
    rope_freqs: np.ndarray | None = None,
    extra: dict | None = None,
    types: dict[str, gguf.GGMLQuantizationType] | None = None,
) -> str:
    """A GGUF file written by the test with gguf's own writer: llama.* metadata, GGUF names, q/k rows in
    Meta's interleaved order (as llama.cpp's converter writes them). Tensors are float32, except those
    whose Hugging Face name ends with a key of ``types``: quantized to that GGML type by gguf's code."""
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
        tensor = np.ascontiguousarray(tensor, np.float32)
        qtype = next((t for suffix, t in (types or {}).items() if name.endswith(suffix)), None)
        if qtype is None:
            writer.add_tensor(gguf_name, tensor)
        else:
            writer.add_tensor(gguf_name, gguf.quants.quantize(tensor, qtype), raw_dtype=qtype)
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

"""Weight-only quantization (int8, int4 in groups, GGUF blocks kept quantized) and QLoRA on top of it."""

from __future__ import annotations

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import max_diff
from flax import nnx
from test_convert_gguf import write_gguf

import llama_jax
from llama_jax import CheckpointError, QuantizationError, QuantizedEmbed, QuantizedLinear
from llama_jax.quantize import QuantizedWeight, is_quantized

IDS = np.random.RandomState(0).randint(3, 256, (2, 48))


def load(directory):
    return llama_jax.from_pretrained(directory, dtype=jnp.float32, progress=False)


@pytest.fixture(scope="module")
def tied(tiny_checkpoints):
    return tiny_checkpoints["llama32_tied"]


@pytest.fixture(scope="module")
def float_logits(tied):
    return np.asarray(load(tied)(jnp.asarray(IDS)))


def relative_errors(a, b) -> tuple[float, float]:
    """(mean, max) |a - b| over the float logits' spread (their standard deviation)."""
    diff = np.abs(np.asarray(a, np.float32) - b) / float(np.std(b))
    return float(diff.mean()), float(diff.max())


def param_bytes(model) -> int:
    return sum(v.get_value().nbytes for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param)))


@pytest.mark.parametrize(
    "bits, group_size, embeddings, tolerance",
    # measured on this random tiny model (mean / std): int8 0.017, int8 g32 0.013-0.017, int4 g32 0.19-0.23
    [(8, None, False, 0.03), (8, 32, True, 0.03), (4, 32, False, 0.3), (4, 32, True, 0.35)],
)
def test_quantized_logits_are_close_to_float(tied, float_logits, bits, group_size, embeddings, tolerance):
    model = llama_jax.quantize(load(tied), bits=bits, group_size=group_size, embeddings=embeddings)
    assert isinstance(model.model.layers[0].self_attn.q_proj, QuantizedLinear)
    assert isinstance(model.model.embed_tokens, QuantizedEmbed) == embeddings
    many = np.asarray(model(jnp.asarray(IDS)))  # prompt path: dequantize once, one matmul
    few = np.asarray(model(jnp.asarray(IDS[:1, :3])))  # decode path: the integers directly
    mean, largest = relative_errors(many, float_logits)
    print(
        f"int{bits} group {group_size} embeddings={embeddings}: |logit diff| / logit std: mean {mean:.3f}, "
        f"max {largest:.3f}; argmax equal {np.mean(many.argmax(-1) == float_logits.argmax(-1)):.0%}"
    )
    assert mean < tolerance
    assert max_diff(few, many[:1, :3]) < 1e-4  # both paths compute the same numbers


def test_quantized_model_generates(tied):
    """The KV-cache decoder (the integer path, a row at a time) gives the tokens of the full forward pass
    (the dequantized path); agreement with float32's tokens is printed (a random tiny model drifts fast)."""
    prompt = IDS[:, :8]
    reference = np.asarray(llama_jax.generate(load(tied), prompt, max_new_tokens=16, eos_token_id=-1))
    for bits, group_size in ((8, None), (4, 32)):
        model = llama_jax.quantize(load(tied), bits=bits, group_size=group_size, embeddings=True)
        tokens = np.asarray(llama_jax.generate(model, prompt, max_new_tokens=16, eos_token_id=-1))
        np.testing.assert_array_equal(tokens, llama_jax.generate_naive(model, prompt, max_new_tokens=16))
        agreement = float(np.mean(tokens == reference))
        print(f"int{bits} group {group_size}: greedy tokens equal to float32's: {agreement:.0%}")
        if bits == 8:
            assert agreement >= 0.7


def test_no_float_copy_of_quantized_weights(tied):
    model = load(tied)
    before = param_bytes(model)
    llama_jax.quantize(model, bits=8, embeddings=True)
    after = param_bytes(model)
    quantized = sum(v.get_value().nbytes for _, v in nnx.to_flat_state(nnx.state(model, QuantizedWeight)))
    print(f"nnx.Param bytes {before} -> {after} (norms only); quantized values and scales {quantized} bytes")
    norms = sum(
        v.get_value().nbytes for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param)) if "norm" in str(p)
    )
    assert after == norms
    assert quantized < before / 3
    assert is_quantized(model)
    with pytest.raises(CheckpointError, match="quantized"):
        llama_jax.save_pretrained(model, "/nonexistent/never-written")


def test_errors_are_one_line(tied):
    model = load(tied)
    cases = [
        (dict(bits=3), "bits=3 is not supported; use one of \\[4, 8\\]"),
        (dict(bits=8, group_size=48), "group_size=48 does not divide model.layers.0.self_attn.q_proj's"),
        (dict(bits=4), "int4 needs groups"),
        (dict(targets=("q_proj", "qkv")), "targets \\['qkv'\\] match no layer"),
    ]
    for kwargs, message in cases:
        with pytest.raises(QuantizationError, match=message) as error:
            llama_jax.quantize(model, **kwargs)
        assert "\n" not in str(error.value)
    assert isinstance(model.model.layers[0].self_attn.q_proj, nnx.Linear)  # nothing changed


def test_qlora_trains_adapters_only(tied):
    model = llama_jax.quantize(load(tied), bits=4, group_size=32)
    llama_jax.add_lora(model, rank=4, alpha=8)
    frozen = jax.tree.map(np.asarray, nnx.state(model, QuantizedWeight))
    norms = jax.tree.map(np.asarray, nnx.state(model, nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))))
    optimizer = llama_jax.train.lora_optimizer(model, 1e-2)
    ids = IDS[:, :24]
    mask, loss_mask = np.ones_like(ids), np.ones_like(ids)
    losses = [llama_jax.train.train_step(model, optimizer, ids, mask, loss_mask) for _ in range(5)]
    print(f"QLoRA int4 g32, 5 steps: loss {losses[0]:.3f} -> {losses[-1]:.3f}")
    assert losses[-1] < losses[0]
    jax.tree.map(
        np.testing.assert_array_equal, frozen, jax.tree.map(np.asarray, nnx.state(model, QuantizedWeight))
    )
    jax.tree.map(
        np.testing.assert_array_equal,
        norms,
        jax.tree.map(np.asarray, nnx.state(model, nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam)))),
    )
    with pytest.raises(llama_jax.AdapterError, match="quantized; pass dtype=") as error:
        llama_jax.merge_lora(model)
    assert "\n" not in str(error.value)
    merged = llama_jax.merge_lora(model, dtype=jnp.float32)
    assert not is_quantized(merged)
    ids = jnp.asarray(IDS)
    assert max_diff(merged(ids), model(ids)) < 1e-3


# --------------------------------------------------------------------------------------------- GGUF


@pytest.fixture(scope="module")
def bundled():
    """The bundled Q4_1 file, loaded dequantized and kept quantized (once for the module)."""
    path = llama_jax.checkpoints.bundled_gguf_path()
    dense = llama_jax.convert.from_gguf(path, dtype=jnp.float32, progress=False)
    kept = llama_jax.convert.from_gguf(path, dtype=jnp.float32, keep_quantized=True, progress=False)
    return dense, kept


def test_bundled_gguf_kept_quantized_equals_dequantized(bundled):
    dense, kept = bundled
    q_proj = kept.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, QuantizedLinear) and q_proj.offset is not None and q_proj.group_size == 32
    assert isinstance(kept.model.embed_tokens, QuantizedEmbed)  # token_embd is Q8_0
    np.testing.assert_array_equal(q_proj.dequantize(), dense.model.layers[0].self_attn.q_proj.kernel[...])
    ids = jnp.asarray(np.random.RandomState(1).randint(3, 49152, (1, 64)))
    prompt = max_diff(kept(ids), dense(ids))
    step = max_diff(kept(ids[:, :2]), dense(ids[:, :2]))
    print(
        f"bundled Q4_1 kept quantized vs dequantized: max |logit diff| prompt {prompt:.1e}, 2 rows {step:.1e}"
    )
    assert prompt <= 1e-3 and step <= 1e-3
    print(f"bundled Q4_1: nnx.Param bytes {param_bytes(dense)} dequantized, {param_bytes(kept)} kept")


def write_quantized_gguf(hf_dir: str, path, types: dict[str, gguf.GGMLQuantizationType]) -> str:
    """A tiny GGUF file (default RoPE) whose tensors named in ``types`` are quantized by gguf's own code."""
    return write_gguf(hf_dir, path, types=types)


def test_tiny_gguf_q8_0_and_q4_0_kept_quantized(tiny_checkpoints, tmp_path):
    Q = gguf.GGMLQuantizationType
    types = {  # the first suffix that fits wins
        "mlp.up_proj.weight": Q.Q4_0,
        "mlp.down_proj.weight": Q.Q4_1,
        "_proj.weight": Q.Q8_0,
        "embed_tokens.weight": Q.Q4_0,
        "lm_head.weight": Q.Q8_0,
    }
    path = write_quantized_gguf(tiny_checkpoints["untied"], tmp_path / "tiny.gguf", types)
    dense = llama_jax.convert.from_gguf(path, dtype=jnp.float32, progress=False)
    kept = llama_jax.convert.from_gguf(path, dtype=jnp.float32, keep_quantized=True, progress=False)
    layer = kept.model.layers[1]
    assert (
        layer.self_attn.k_proj.bits == 8 and layer.mlp.up_proj.bits == 4 and layer.mlp.up_proj.offset is None
    )
    assert layer.mlp.down_proj.offset is not None and isinstance(kept.lm_head, QuantizedLinear)
    assert isinstance(kept.model.embed_tokens, QuantizedEmbed)
    for name in ("q_proj", "k_proj"):  # the rows un-permuted like the dequantized tensors
        np.testing.assert_array_equal(
            getattr(layer.self_attn, name).dequantize(),
            getattr(dense.model.layers[1].self_attn, name).kernel[...],
        )
    ids = jnp.asarray(IDS)
    prompt, step = max_diff(kept(ids), dense(ids)), max_diff(kept(ids[:1, :2]), dense(ids[:1, :2]))
    print(
        f"tiny Q8_0/Q4_0/Q4_1 GGUF kept quantized vs dequantized: max |diff| {prompt:.1e}, 2 rows {step:.1e}"
    )
    assert prompt <= 1e-4 and step <= 1e-4


def test_gguf_type_that_cannot_be_kept_quantized(tiny_checkpoints, tmp_path):
    Q = gguf.GGMLQuantizationType
    path = write_quantized_gguf(tiny_checkpoints["untied"], tmp_path / "q5.gguf", {"o_proj.weight": Q.Q5_0})
    with pytest.raises(
        CheckpointError, match="blk.0.attn_output.weight is Q5_0.*keep_quantized=False"
    ) as error:
        llama_jax.convert.from_gguf(path, keep_quantized=True, progress=False)
    assert "\n" not in str(error.value)
    llama_jax.convert.from_gguf(path, keep_quantized=False, progress=False)  # the dequantized path works

"""llama.cpp's GGUF files: one file holding the config (``llama.*`` metadata keys), the tokenizer and
the tensors, most of them quantized in blocks (Q4_1: 32 weights share a float16 scale and minimum).

What differs from Hugging Face's format:

* names: ``blk.3.attn_q.weight`` is ``model.layers.3.self_attn.q_proj.weight``, and so on;
* shapes are listed in GGML's order, fastest-varying dimension first: a [out, in] matrix is ``[in, out]``;
* q/k rows are in Meta's interleaved layout (llama.cpp's converter permutes them back to Meta's order),
  so they are un-permuted exactly as for Meta's checkpoint;
* Llama 3.1/3.2 files carry llama3 RoPE scaling as a tensor, ``rope_freqs.weight``: for each frequency
  the number its wavelength is multiplied by;
* the tokenizer is a list of ``tokenizer.ggml.*`` keys (tokens, merges, special token ids) and the chat
  template, not a ``tokenizer.json``.
"""

from __future__ import annotations

import os
import re

import jax.numpy as jnp
import numpy as np

from ..config import CheckpointError, ConfigError, LlamaConfig, RopeScaling
from ..extras import import_transformers
from ..model import LlamaForCausalLM
from ..quantize import QuantizedEmbed, QuantizedLinear
from ..rope import default_inverse_frequencies, llama3_scale_frequencies
from ..sharding import TENSOR_PARALLEL
from ..weights import model_from_tensors
from .meta import unpermute_qk

_TOP_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
_LAYER = re.compile(r"^blk\.(\d+)\.(.+)$")


def gguf_to_hf_name(name: str) -> str:
    """GGUF tensor name -> Hugging Face's (an unknown name is returned unchanged, to be reported)."""
    if name in _TOP_NAMES:
        return _TOP_NAMES[name]
    match = _LAYER.match(name)
    if match and match.group(2) in _LAYER_NAMES:
        return f"model.layers.{match.group(1)}.{_LAYER_NAMES[match.group(2)]}"
    return name


def gguf_metadata(reader) -> dict:
    """Every metadata key except the tokenizer's long arrays, as Python values."""
    return {
        key: field.contents()
        for key, field in reader.fields.items()
        if not (
            key.startswith("tokenizer.ggml.") and key.endswith(("tokens", "token_type", "merges", "scores"))
        )
    }


def _rope_scaling_from_factors(
    factors: np.ndarray, head_dim: int, theta: float, given: RopeScaling | None, source: str
):
    """The llama3 RoPE scaling that ``rope_freqs.weight`` encodes: Meta's values (factor = the largest
    multiplier, low 1, high 4, original context 8192) unless the caller gives others; either way it must
    reproduce the tensor, or the file's RoPE is something this package does not implement."""
    scaling = given or RopeScaling(factor=float(factors.max()))
    inv_freq = default_inverse_frequencies(head_dim, theta)
    implied = inv_freq / llama3_scale_frequencies(inv_freq, scaling)
    if factors.shape != implied.shape or not np.allclose(factors, implied, rtol=1e-5):
        raise ConfigError(
            f"{source}: rope_freqs.weight does not match llama3 RoPE scaling {scaling} "
            f"(max difference {np.max(np.abs(factors - implied)) if factors.shape == implied.shape else 'shape'}); "
            "pass rope_scaling=RopeScaling(...) with the model's values"
        )
    return scaling


def gguf_config(
    meta: dict, shapes: dict, rope_factors: np.ndarray | None, rope_scaling=None, source="gguf"
) -> LlamaConfig:
    """A LlamaConfig from a GGUF file's ``llama.*`` metadata (and its ``rope_freqs`` tensor)."""
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise ConfigError(f"{source}: general.architecture={arch!r}; only 'llama' files are supported")

    def key(name, default=None, kind=int):
        value = meta.get(f"llama.{name}", default)
        if value is None:
            raise ConfigError(f"{source}: metadata key llama.{name} is missing")
        if isinstance(value, list):
            raise ConfigError(f"{source}: llama.{name} varies by layer ({value[:4]}...); not supported")
        return kind(value)

    hidden, heads = key("embedding_length"), key("attention.head_count")
    head_dim = key("attention.key_length", hidden // heads)
    if (rotary := key("rope.dimension_count", head_dim)) != head_dim:
        raise ConfigError(
            f"{source}: llama.rope.dimension_count={rotary} differs from head_dim={head_dim} (partial RoPE)"
        )
    if (scaling_type := meta.get("llama.rope.scaling.type", "none")) != "none":
        raise ConfigError(f"{source}: unsupported llama.rope.scaling.type={scaling_type!r}")
    theta = key("rope.freq_base", 10000.0, float)
    scaling = None
    if rope_factors is not None:
        scaling = _rope_scaling_from_factors(rope_factors, head_dim, theta, rope_scaling, source)
    vocab = meta.get("llama.vocab_size") or shapes.get("model.embed_tokens.weight", (None,))[0]
    if vocab is None:
        raise ConfigError(f"{source}: no llama.vocab_size and no token_embd.weight")
    eos = meta.get("tokenizer.ggml.eos_token_id")
    return LlamaConfig(
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=key("feed_forward_length"),
        num_hidden_layers=key("block_count"),
        num_attention_heads=heads,
        num_key_value_heads=key("attention.head_count_kv", heads),
        head_dim=head_dim,
        rms_norm_eps=key("attention.layer_norm_rms_epsilon", kind=float),
        rope_theta=theta,
        rope_scaling=scaling,
        max_position_embeddings=key("context_length", 2048),
        tie_word_embeddings="lm_head.weight" not in shapes,
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
        eos_token_id=() if eos is None else (int(eos),),
        pad_token_id=meta.get("tokenizer.ggml.padding_token_id"),
    )


def _read_gguf(path: str | os.PathLike):
    """A ``gguf.GGUFReader`` (memory-mapped), or a CheckpointError naming the file."""
    import gguf

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"no GGUF file at {path}")
    try:
        return gguf.GGUFReader(path)
    except Exception as e:  # bad magic, truncated file, ...
        raise CheckpointError(f"cannot read {path} as GGUF: {e}") from None


def from_gguf(
    path: str | os.PathLike,
    dtype=jnp.bfloat16,
    *,
    rope_scaling: RopeScaling | None = None,
    progress: bool | None = None,
    mesh=None,
    rules=TENSOR_PARALLEL,
    keep_quantized: bool = False,
) -> LlamaForCausalLM:
    """Load a llama.cpp GGUF file (architecture ``llama``), dequantizing every tensor to ``dtype``.

    Tensors are read with ``gguf.GGUFReader`` (memory-mapped) and dequantized one at a time with
    ``gguf.quants.dequantize``. The head is tied when the file has no ``output.weight``. For Llama 3.1/3.2
    files the llama3 RoPE scaling is recovered from ``rope_freqs.weight`` (Meta's values, the factor read
    from the tensor) and checked against it; ``rope_scaling`` overrides the guess for other values.

    ``keep_quantized=True`` keeps Q8_0, Q4_0 and Q4_1 weights as they are in the file: each projection
    becomes a ``QuantizedLinear`` (and a tied embedding in those types a ``QuantizedEmbed``) built from
    the blocks' integers and scales, with no float copy; ``dtype`` is then the compute dtype. A projection
    in another quantized type is refused (``keep_quantized=False`` dequantizes it); norms stay float.
    """
    import gguf

    path = os.fspath(path)
    reader = _read_gguf(path)
    tensors = {t.name: t for t in reader.tensors}
    rope_freqs = tensors.pop("rope_freqs.weight", None)
    hf_names = {gguf_to_hf_name(name): name for name in tensors}
    # GGML lists dimensions fastest-first: reversed, they are numpy's (and PyTorch's) order.
    shapes = {hf: tuple(int(d) for d in reversed(tensors[g].shape)) for hf, g in hf_names.items()}
    factors = (
        None
        if rope_freqs is None
        else np.asarray(gguf.quants.dequantize(rope_freqs.data, rope_freqs.tensor_type), np.float32).ravel()
    )
    config = gguf_config(gguf_metadata(reader), shapes, factors, rope_scaling, source=path)

    def read(hf_name: str) -> np.ndarray:
        tensor = tensors[hf_names[hf_name]]
        try:
            w = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        except NotImplementedError:
            raise CheckpointError(
                f"{path}: tensor {tensor.name} is {tensor.tensor_type.name}, which gguf cannot dequantize"
            ) from None
        return unpermute_qk(hf_name, np.asarray(w, np.float32).reshape(shapes[hf_name]), config)

    modules = {}
    if keep_quantized:
        for hf_name, gguf_name in hf_names.items():
            module = _kept_quantized(tensors[gguf_name], hf_name, shapes[hf_name], config, dtype, path)
            if module is not None:
                modules[hf_name.removesuffix(".weight")] = module
    return model_from_tensors(
        config,
        shapes,
        read,
        dtype=dtype,
        source=path,
        progress=progress,
        mesh=mesh,
        rules=rules,
        modules=modules,
    )


# bytes per block of 32 weights, for the types kept quantized: Q8_0 (f16 d, 32 int8: w = d * q),
# Q4_0 (f16 d, 16 bytes of nibbles: w = d * (q - 8)), Q4_1 (f16 d, f16 m, 16 bytes: w = d * q + m)
_BLOCK_BYTES = {"Q8_0": 34, "Q4_0": 18, "Q4_1": 20}
_FLOAT_TYPES = ("F32", "F16", "BF16")


def gguf_blocks(data: np.ndarray, type_name: str, shape: tuple[int, int]):
    """A Q8_0/Q4_0/Q4_1 tensor's raw blocks -> (q int8 (out, in), scale (out, in/32), offset or None),
    the layout of ``quantize.QuantizedLinear``: no float copy of the weights, only of the scales."""
    rows, cols = shape
    blocks = np.asarray(data, np.uint8).reshape(rows, cols // 32, _BLOCK_BYTES[type_name])
    scale = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    offset = None
    if type_name == "Q8_0":
        return blocks[..., 2:].copy().view(np.int8).reshape(rows, cols), scale, None
    if type_name == "Q4_1":
        offset = blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
    nibbles = blocks[..., -16:]  # element j < 16 in the low nibble of byte j, element 16 + j in its high one
    q = np.concatenate([nibbles & 0x0F, nibbles >> 4], axis=-1).astype(np.int8).reshape(rows, cols)
    if type_name == "Q4_0":
        q -= 8
    return q, scale, offset


def _kept_quantized(tensor, hf_name: str, shape, config, dtype, source):
    """The quantized module for one GGUF tensor, or None when it stays float (norms, a float tensor, an
    embedding in a type we do not keep)."""
    type_name = tensor.tensor_type.name
    embedding = hf_name == "model.embed_tokens.weight"
    projection = hf_name == "lm_head.weight" or hf_name.endswith("_proj.weight")
    if not (embedding or projection) or type_name in _FLOAT_TYPES:
        return None
    if type_name not in _BLOCK_BYTES:
        if embedding:
            return None  # dequantized, as without keep_quantized
        raise CheckpointError(
            f"{source}: tensor {tensor.name} is {type_name}, which cannot be kept quantized "
            f"(Q8_0, Q4_0, Q4_1 can); pass keep_quantized=False to dequantize it"
        )
    q, scale, offset = gguf_blocks(tensor.data, type_name, shape)
    q, scale = unpermute_qk(hf_name, q, config), unpermute_qk(hf_name, scale, config)  # rows, like the floats
    if offset is not None:
        offset = unpermute_qk(hf_name, offset, config)
    bits = 8 if type_name == "Q8_0" else 4
    parts = [jnp.asarray(a) for a in (q, scale)] + [None if offset is None else jnp.asarray(offset)]
    cls = QuantizedEmbed if embedding else QuantizedLinear
    return cls(*parts, bits=bits, dtype=dtype)


_SPECIAL_TOKEN_IDS = {
    "bos_token": "bos_token_id",
    "eos_token": "eos_token_id",
    "unk_token": "unknown_token_id",
    "pad_token": "padding_token_id",
}


def tokenizer_from_gguf(path: str | os.PathLike):
    """The tokenizer a GGUF file describes, as a transformers fast tokenizer with the file's special
    tokens and chat template; ``save_pretrained`` writes it as ``tokenizer.json`` and friends.

    The fields are read with ``gguf`` and turned into a tokenizer by transformers' own GGUF builder,
    the one ``AutoTokenizer.from_pretrained(directory, gguf_file=...)`` uses (that route reads the file
    with PyTorch; this one needs no PyTorch).
    """
    PreTrainedTokenizerFast = import_transformers().PreTrainedTokenizerFast
    from transformers.integrations.gguf.gguf_tokenizer_mapping import (
        GGUF_TOKENIZER_MAPPING,
        convert_gguf_tokenizer,
    )

    path = os.fspath(path)
    reader = _read_gguf(path)
    fields = {key: field.contents() for key, field in reader.fields.items() if key.startswith("tokenizer.")}
    if "tokenizer.ggml.tokens" not in fields:
        raise CheckpointError(f"{path}: no tokenizer in the file (tokenizer.ggml.tokens is missing)")

    def renamed(group: str) -> dict:  # the file's keys under transformers' names
        mapping = GGUF_TOKENIZER_MAPPING[group]
        return {
            name: fields[f"tokenizer.{key}"] for key, name in mapping.items() if f"tokenizer.{key}" in fields
        }

    tokenizer_dict = renamed("tokenizer")  # tokens, merges, token types, ...
    init_kwargs = renamed("tokenizer_config")  # the chat template, add_bos_token
    if (
        tokenizer_dict.get("tokenizer_type") == "llama"
    ):  # sentencepiece: llama.cpp adds BOS unless told not to
        init_kwargs.setdefault("add_bos_token", True)
    for name, id_key in _SPECIAL_TOKEN_IDS.items():
        index = fields.get(f"tokenizer.ggml.{id_key}")
        init_kwargs[name] = None if index is None else tokenizer_dict["tokens"][index]
    architecture = reader.fields["general.architecture"].contents()
    backend, extra_kwargs = convert_gguf_tokenizer(architecture, tokenizer_dict)
    return PreTrainedTokenizerFast(tokenizer_object=backend, **init_kwargs, **extra_kwargs)

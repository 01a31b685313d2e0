"""Keras Hub's Llama 3 (``keras_hub.models.Llama3CausalLM`` / ``Llama3Backbone``) -> llama_jax.

Keras Hub keeps the same weights under other names and in other layouts (H hidden, N query heads,
K key/value heads, D head_dim, I intermediate, V vocabulary; Keras shape -> Hugging Face shape):

* ``token_embedding/embeddings`` (V, H) -> ``model.embed_tokens.weight`` (V, H)
* ``token_embedding/reverse_embeddings`` (H, V), untied models only -> ``lm_head.weight`` (V, H)
* ``transformer_layer_{i}/self_attention/query/kernel`` (H, N, D) -> ``...self_attn.q_proj.weight`` (N*D, H);
  ``key``/``value`` (H, K, D) -> ``k_proj``/``v_proj`` (K*D, H)
* ``.../self_attention/attention_output/kernel`` (N, D, H) -> ``...self_attn.o_proj.weight`` (H, N*D)
* ``.../feedforward_gate_dense``, ``_intermediate_dense`` (H, I), ``_output_dense`` (I, H) ->
  ``mlp.gate_proj``, ``up_proj`` (I, H), ``down_proj`` (H, I)
* ``.../self_attention_layernorm/scale``, ``.../feedforward_layernorm/scale`` (H,) ->
  ``input_layernorm``, ``post_attention_layernorm``; ``sequence_output_layernorm/scale`` -> ``model.norm``

Kernels are (in, out) with the heads split out; PyTorch's weights are (out, in). Keras Hub's RoPE is
rotate-half, like transformers', so q/k rows need no permutation.

The config comes from the backbone itself (``get_config()``), not from files: the converted model is
the Keras model, including its RMSNorm epsilon and its RoPE. keras-hub 0.32's Hugging Face importer gets
two of those wrong without a word:

* it does not pass ``rms_norm_eps``, so the backbone keeps its default of 1e-6;
* it reads llama3 RoPE scaling only from the legacy ``rope_scaling`` key, so a Llama 3.1/3.2 checkpoint
  saved by transformers 5 (which writes ``rope_parameters``) loads with plain RoPE.

``keras_backbone_kwargs(config)`` gives the arguments that put both right:
``Llama3Backbone.from_preset(dir, **keras_backbone_kwargs(LlamaConfig.from_hf(dir)))``
(``Llama3CausalLM.from_preset`` does not forward them to its backbone: build the backbone first). Pass
``checkpoint=dir`` to ``from_keras_hub`` and it refuses a Keras model that contradicts its checkpoint.
"""

from __future__ import annotations

import math
import re

import jax.numpy as jnp
import numpy as np

from ..config import CheckpointError, ConfigError, LlamaConfig, RopeScaling
from ..model import LlamaForCausalLM
from ..sharding import TENSOR_PARALLEL
from ..weights import model_from_tensors

_LAYER = re.compile(r"^transformer_layer_(\d+)/(.+)$")
# Keras path inside a layer -> (Hugging Face name inside the layer, Keras kernel rank)
_LAYER_NAMES = {
    "self_attention/query/kernel": ("self_attn.q_proj.weight", 3),
    "self_attention/key/kernel": ("self_attn.k_proj.weight", 3),
    "self_attention/value/kernel": ("self_attn.v_proj.weight", 3),
    "self_attention/attention_output/kernel": ("self_attn.o_proj.weight", 3),
    "feedforward_gate_dense/kernel": ("mlp.gate_proj.weight", 2),
    "feedforward_intermediate_dense/kernel": ("mlp.up_proj.weight", 2),
    "feedforward_output_dense/kernel": ("mlp.down_proj.weight", 2),
    "self_attention_layernorm/scale": ("input_layernorm.weight", 1),
    "feedforward_layernorm/scale": ("post_attention_layernorm.weight", 1),
}
_TOP_NAMES = {
    "token_embedding/embeddings": ("model.embed_tokens.weight", 2),
    "token_embedding/reverse_embeddings": ("lm_head.weight", 2),
    "sequence_output_layernorm/scale": ("model.norm.weight", 1),
}


def keras_to_hf_name(path: str) -> tuple[str, int | None]:
    """Keras variable path -> (Hugging Face name, expected Keras rank); unknown paths come back as is."""
    if path in _TOP_NAMES:
        return _TOP_NAMES[path]
    match = _LAYER.match(path)
    if match and match.group(2) in _LAYER_NAMES:
        name, rank = _LAYER_NAMES[match.group(2)]
        return f"model.layers.{match.group(1)}.{name}", rank
    return path, None


def to_hf_layout(hf_name: str, w: np.ndarray) -> np.ndarray:
    """A Keras Hub weight in Hugging Face's layout: kernels flattened over heads and transposed."""
    if hf_name.endswith("o_proj.weight"):  # (N, D, H) -> (H, N*D)
        return w.reshape(-1, w.shape[-1]).T
    if w.ndim == 3:  # q/k/v (H, heads, D) -> (heads*D, H)
        return w.reshape(w.shape[0], -1).T
    if hf_name.endswith("embed_tokens.weight") or w.ndim == 1:  # (V, H) and norm scales: as they are
        return w
    return w.T  # (in, out) -> (out, in): MLP kernels and the untied head's (H, V)


def hf_shape(hf_name: str, shape: tuple) -> tuple:
    """The shape ``to_hf_layout`` gives a Keras weight of this shape, without reading it."""
    shape = tuple(int(d) for d in shape)
    if hf_name.endswith("o_proj.weight"):
        return (shape[-1], int(np.prod(shape[:-1])))
    if len(shape) == 3:
        return (int(np.prod(shape[1:])), shape[0])
    if hf_name.endswith("embed_tokens.weight") or len(shape) == 1:
        return shape
    return shape[::-1]


def keras_config(backbone, tokenizer=None) -> LlamaConfig:
    """A LlamaConfig from a Keras Hub Llama backbone's own config (``get_config()``)."""
    cfg = backbone.get_config()
    name = type(backbone).__name__
    if cfg.get("rope_position_scaling_factor", 1.0) != 1.0:
        raise ConfigError(
            f"{name}: rope_position_scaling_factor={cfg['rope_position_scaling_factor']} (linear position "
            "scaling) is not Llama 3's RoPE"
        )
    scaling = None
    if cfg.get("rope_frequency_adjustment_factor") is not None:
        scaling = RopeScaling(
            factor=float(cfg["rope_frequency_adjustment_factor"]),
            low_freq_factor=float(cfg["rope_low_freq_factor"]),
            high_freq_factor=float(cfg["rope_high_freq_factor"]),
            original_max_position_embeddings=int(cfg["rope_pretraining_sequence_length"]),
        )
    hidden, heads = cfg["hidden_dim"], cfg["num_query_heads"]
    start = getattr(tokenizer, "start_token_id", None)
    end = getattr(tokenizer, "end_token_id", None)
    return LlamaConfig(
        vocab_size=cfg["vocabulary_size"],
        hidden_size=hidden,
        intermediate_size=cfg["intermediate_dim"],
        num_hidden_layers=cfg["num_layers"],
        num_attention_heads=heads,
        num_key_value_heads=cfg["num_key_value_heads"],
        head_dim=hidden // heads,  # Keras Hub's Llama attention always uses hidden_dim // num_query_heads
        rms_norm_eps=float(cfg["layer_norm_epsilon"]),
        rope_theta=float(cfg["rope_max_wavelength"]),
        rope_scaling=scaling,
        # Keras Hub does not record the context length; these are Llama 3.2's and Llama 3's.
        max_position_embeddings=131072 if scaling else 8192,
        # get_config() leaves this out; the backbone has it as an attribute
        tie_word_embeddings=bool(backbone.tie_word_embeddings),
        bos_token_id=None if start is None else int(start),
        eos_token_id=() if end is None else (int(end),),
    )


def keras_backbone_kwargs(config: LlamaConfig) -> dict:
    """The ``Llama3Backbone`` arguments that keras-hub's Hugging Face importer can get wrong (the RMSNorm
    epsilon, and llama3 RoPE scaling in a transformers 5 config), with the checkpoint's values."""
    scaling = config.rope_scaling
    return {
        "layer_norm_epsilon": config.rms_norm_eps,
        "rope_max_wavelength": config.rope_theta,
        "rope_frequency_adjustment_factor": scaling and scaling.factor,
        "rope_low_freq_factor": scaling and scaling.low_freq_factor,
        "rope_high_freq_factor": scaling and scaling.high_freq_factor,
        "rope_pretraining_sequence_length": scaling and scaling.original_max_position_embeddings,
    }


def check_against_checkpoint(config: LlamaConfig, checkpoint, source: str) -> None:
    """Raise a ConfigError when the Keras model's epsilon or RoPE contradict its Hugging Face checkpoint
    (a directory, a config.json dict or a LlamaConfig)."""
    expected = checkpoint if isinstance(checkpoint, LlamaConfig) else LlamaConfig.from_hf(checkpoint)
    for field in ("rms_norm_eps", "rope_theta", "rope_scaling"):
        ours, theirs = getattr(config, field), getattr(expected, field)
        same = math.isclose(ours, theirs, rel_tol=1e-6) if isinstance(ours, float) else ours == theirs
        if not same:  # (floats: a float32 round trip, 1e-5 -> 9.99999975e-06, is the same epsilon)
            raise ConfigError(
                f"{source} has {field}={ours} but its checkpoint has {theirs}; build the backbone with "
                "Llama3Backbone.from_preset(..., **llama_jax.convert.keras_backbone_kwargs(checkpoint_config))"
            )


def from_keras_hub(
    keras_model_or_backbone,
    dtype=jnp.bfloat16,
    *,
    checkpoint=None,
    progress: bool | None = None,
    mesh=None,
    rules=TENSOR_PARALLEL,
) -> LlamaForCausalLM:
    """Convert a Keras Hub Llama 3 model (``Llama3CausalLM``, or its ``Llama3Backbone``) to llama_jax.

    Every Keras variable must map to a Hugging Face tensor with the right layout; anything else (say,
    the extra scale variables of a quantized Keras model) is named in a CheckpointError. ``checkpoint``:
    the Hugging Face checkpoint the Keras model was loaded from (a directory, a config.json dict or a
    LlamaConfig), if you know it; a Keras model whose RMSNorm epsilon or RoPE differ from it is refused
    with a ConfigError instead of being converted faithfully into the wrong model.
    """
    backbone = getattr(keras_model_or_backbone, "backbone", keras_model_or_backbone)
    if not hasattr(backbone, "get_config") or "num_query_heads" not in backbone.get_config():
        raise CheckpointError(
            f"{type(keras_model_or_backbone).__name__} is not a Keras Hub Llama model or backbone"
        )
    preprocessor = getattr(keras_model_or_backbone, "preprocessor", None)
    config = keras_config(backbone, getattr(preprocessor, "tokenizer", None))
    source = f"Keras Hub {type(keras_model_or_backbone).__name__}"
    if checkpoint is not None:
        check_against_checkpoint(config, checkpoint, source)

    variables, shapes = {}, {}
    for variable in backbone.weights:
        hf_name, rank = keras_to_hf_name(variable.path)
        if hf_name in variables:
            raise CheckpointError(
                f"{source}: two variables map to {hf_name} ({variables[hf_name].path}, {variable.path})"
            )
        if rank is not None and len(variable.shape) != rank:
            raise CheckpointError(
                f"{source}: {variable.path} has shape {tuple(variable.shape)}, not the {rank}-d layout this converter knows"
            )
        variables[hf_name] = variable
        shapes[hf_name] = hf_shape(hf_name, variable.shape) if rank else tuple(variable.shape)

    def read(hf_name: str) -> np.ndarray:
        return to_hf_layout(hf_name, np.asarray(variables[hf_name].value))

    return model_from_tensors(
        config, shapes, read, dtype=dtype, source=source, progress=progress, mesh=mesh, rules=rules
    )

"""The model's configuration: every field of a Llama 3.x / SmolLM2 ``config.json`` that changes the math.

``LlamaConfig.from_hf`` reads both spellings that exist in the wild:

* older files (and Meta's Llama 3.2 repos): a top-level ``rope_theta`` plus ``rope_scaling``;
* transformers 5 files: ``rope_parameters = {"rope_theta": ..., "rope_type": ..., ...}``.

Anything this package cannot reproduce exactly (another architecture, biases, another RoPE type)
raises a ``ConfigError`` that names the field and its value instead of giving silently wrong logits.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from typing import Any


class ConfigError(ValueError):
    """A config.json field has a value this package does not support (or is missing)."""


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable, or does not match its config."""


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Llama 3's frequency scaling (``rope_type: llama3``); see the RoPE chapter."""

    factor: float = 32.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    rope_scaling: RopeScaling | None = None  # None means plain RoPE (rope_type "default")
    max_position_embeddings: int = 131072
    tie_word_embeddings: bool = True
    bos_token_id: int | None = None
    eos_token_id: tuple[int, ...] = ()
    pad_token_id: int | None = None

    def __post_init__(self):
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )

    @property
    def num_query_groups(self) -> int:
        """How many query heads share one key/value head (grouped-query attention)."""
        return self.num_attention_heads // self.num_key_value_heads

    @classmethod
    def from_hf(cls, path_or_dict: str | os.PathLike | Mapping[str, Any]) -> LlamaConfig:
        """Read a Hugging Face ``config.json`` (a file, the directory holding it, or the parsed dict)."""
        if isinstance(path_or_dict, Mapping):
            return _from_dict(path_or_dict)
        path = os.fspath(path_or_dict)
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        try:
            with open(path) as f:
                raw = json.load(f)
        except FileNotFoundError:
            raise ConfigError(f"no config.json at {path}") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} is not valid JSON: {e}") from None
        return _from_dict(raw, source=path)

    def to_hf(self) -> dict[str, Any]:
        """The config.json dict that transformers' ``LlamaForCausalLM`` loads back to the same model."""
        rope_scaling = None
        if self.rope_scaling is not None:
            rope_scaling = {"rope_type": "llama3", **dataclasses.asdict(self.rope_scaling)}
        eos = list(self.eos_token_id)
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": rope_scaling,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_bias": False,
            "mlp_bias": False,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": eos[0] if len(eos) == 1 else (eos or None),
            "pad_token_id": self.pad_token_id,
        }


def _from_dict(raw: Mapping[str, Any], source: str = "config") -> LlamaConfig:
    def need(field):
        if raw.get(field) is None:
            raise ConfigError(f"{source}: required field {field!r} is missing")
        return raw[field]

    def unsupported(field, value, why):
        raise ConfigError(f"{source}: unsupported {field}={value!r} ({why})")

    model_type = raw.get("model_type", "llama")
    if model_type != "llama":
        unsupported("model_type", model_type, "only Llama-architecture models are supported")
    for field in ("attention_bias", "mlp_bias"):
        if raw.get(field):
            unsupported(field, raw[field], "Llama 3 has no bias terms")
    act = raw.get("hidden_act", "silu")
    if act != "silu":
        unsupported("hidden_act", act, "Llama's MLP is SwiGLU, i.e. silu")

    hidden, heads = int(need("hidden_size")), int(need("num_attention_heads"))
    head_dim = raw.get("head_dim") or hidden // heads

    # RoPE: transformers 5 nests theta in rope_parameters; older files use rope_theta + rope_scaling.
    rope = dict(raw.get("rope_parameters") or raw.get("rope_scaling") or {})
    rope_theta = float(rope.get("rope_theta", raw.get("rope_theta", 10000.0)))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    field = "rope_parameters.rope_type" if raw.get("rope_parameters") else "rope_scaling.rope_type"
    if rope_type == "default":
        scaling = None
    elif rope_type == "llama3":
        try:
            scaling = RopeScaling(
                factor=float(rope["factor"]),
                low_freq_factor=float(rope["low_freq_factor"]),
                high_freq_factor=float(rope["high_freq_factor"]),
                original_max_position_embeddings=int(rope["original_max_position_embeddings"]),
            )
        except KeyError as e:
            raise ConfigError(f"{source}: llama3 RoPE scaling needs {e.args[0]!r}") from None
    else:
        unsupported(field, rope_type, "supported: 'default', 'llama3'")

    eos = raw.get("eos_token_id")
    eos = () if eos is None else tuple(eos) if isinstance(eos, (list, tuple)) else (int(eos),)
    heads_kv = raw.get("num_key_value_heads") or heads
    return LlamaConfig(
        vocab_size=int(need("vocab_size")),
        hidden_size=hidden,
        intermediate_size=int(need("intermediate_size")),
        num_hidden_layers=int(need("num_hidden_layers")),
        num_attention_heads=heads,
        num_key_value_heads=int(heads_kv),
        head_dim=int(head_dim),
        rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
        rope_theta=rope_theta,
        rope_scaling=scaling,
        max_position_embeddings=int(raw.get("max_position_embeddings", 2048)),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        bos_token_id=raw.get("bos_token_id"),
        eos_token_id=eos,
        pad_token_id=raw.get("pad_token_id"),
    )


# Meta's published config.json of meta-llama/Llama-3.2-1B (public, no licence needed to read it):
# used by the book to compare with the default model, and by the benchmark to build a random model
# of exactly this shape.
LLAMA_3_2_1B = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": 128256,
    "hidden_size": 2048,
    "intermediate_size": 8192,
    "num_hidden_layers": 16,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 64,
    "hidden_act": "silu",
    "rms_norm_eps": 1e-05,
    "rope_theta": 500000.0,
    "rope_scaling": {
        "factor": 32.0,
        "high_freq_factor": 4.0,
        "low_freq_factor": 1.0,
        "original_max_position_embeddings": 8192,
        "rope_type": "llama3",
    },
    "max_position_embeddings": 131072,
    "tie_word_embeddings": True,
    "attention_bias": False,
    "mlp_bias": False,
    "bos_token_id": 128000,
    "eos_token_id": 128001,
    "torch_dtype": "bfloat16",
}

"""The simplest PyTorch path: a transformers ``LlamaForCausalLM.state_dict()`` already in memory.

The names and layouts are Hugging Face's already; only the tensors change library (torch -> numpy ->
JAX), one at a time.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np

from ..config import CheckpointError, LlamaConfig
from ..extras import import_torch
from ..model import LlamaForCausalLM
from ..sharding import TENSOR_PARALLEL
from ..weights import model_from_tensors


def _config(config: Any) -> LlamaConfig:
    if isinstance(config, LlamaConfig):
        return config
    if hasattr(config, "to_dict"):  # a transformers PretrainedConfig
        return LlamaConfig.from_hf(config.to_dict())
    if isinstance(config, Mapping):  # a config.json dict
        return LlamaConfig.from_hf(config)
    raise TypeError(
        f"config must be a llama_jax.LlamaConfig, a transformers config or a dict, not {type(config).__name__}"
    )


def from_torch_state_dict(
    state_dict: Mapping[str, Any],
    config: Any,
    dtype=jnp.bfloat16,
    *,
    progress: bool | None = None,
    mesh=None,
    rules=TENSOR_PARALLEL,
) -> LlamaForCausalLM:
    """Build the model from a transformers ``LlamaForCausalLM.state_dict()`` (torch tensors, any dtype).

    ``config``: a ``llama_jax.LlamaConfig``, the transformers model's ``config``, or a config.json dict.
    """
    torch = import_torch("from_torch_state_dict")
    config = _config(config)
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"state_dict must be a mapping of names to tensors, not {type(state_dict).__name__}")
    for name, tensor in state_dict.items():
        if not isinstance(tensor, torch.Tensor):
            raise CheckpointError(f"state_dict: {name} is a {type(tensor).__name__}, not a torch.Tensor")
    shapes = {name: tuple(tensor.shape) for name, tensor in state_dict.items()}

    def read(name: str) -> np.ndarray:
        # numpy has no bfloat16: go through float32, which holds every bfloat16/float16 value exactly
        return state_dict[name].detach().to("cpu", torch.float32).numpy()

    return model_from_tensors(
        config, shapes, read, dtype=dtype, source="state_dict", progress=progress, mesh=mesh, rules=rules
    )

"""Hugging Face tensors <-> the NNX model's parameters.

A Hugging Face name maps to an NNX path by replacing the dots with path steps:
``model.layers.3.self_attn.q_proj.weight`` is ``model / layers / 3 / self_attn / q_proj / kernel``.
Linear weights are stored (out, in) by PyTorch and (in, out) by Flax, so they are transposed;
embeddings and norm weights are not.

Loading is strict: before any tensor is read, the names and shapes in the checkpoint are compared
with what the config implies, and every missing, unexpected or mis-shaped tensor is named in one
error. Tensors are then read one at a time into an abstract (not yet allocated) model, so at most one
tensor exists twice in memory.
"""

from __future__ import annotations

import json
import os
from typing import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from .config import LlamaConfig
from .model import LlamaForCausalLM


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable, or does not match its config."""


def hf_name(path: tuple) -> str:
    """NNX path -> Hugging Face tensor name: (..., 'q_proj', 'kernel') -> '....q_proj.weight'."""
    return ".".join(str(step) for step in path[:-1]) + ".weight"


def _abstract_model(config: LlamaConfig, dtype) -> LlamaForCausalLM:
    """The model's structure and parameter shapes, with no memory allocated for the parameters."""
    return nnx.eval_shape(lambda: LlamaForCausalLM(config, dtype=dtype, rngs=nnx.Rngs(0)))


def expected_tensors(config: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor a Hugging Face checkpoint of this config holds, with its (PyTorch-layout) shape."""
    _, state = nnx.split(_abstract_model(config, jnp.float32))
    shapes = {}
    for path, variable in nnx.to_flat_state(state):
        shape = variable.get_value().shape
        shapes[hf_name(path)] = shape[::-1] if path[-1] == "kernel" else shape
    return shapes


def _ignored(name: str, config: LlamaConfig) -> bool:
    # A tied checkpoint may still carry a copy of the head (transformers ignores it); old
    # checkpoints carry RoPE's inverse-frequency buffer, which is computed, not learned.
    return (config.tie_word_embeddings and name == "lm_head.weight") or name.endswith("rotary_emb.inv_freq")


def _names(names, limit=6) -> str:
    names = sorted(names)
    shown = ", ".join(names[:limit])
    return shown + (f" ... ({len(names) - limit} more)" if len(names) > limit else "")


def check_tensors(config: LlamaConfig, shapes: Mapping[str, tuple[int, ...]], source: str) -> None:
    """Raise a CheckpointError naming every missing, unexpected or mis-shaped tensor."""
    expected = expected_tensors(config)
    present = {n: tuple(s) for n, s in shapes.items() if not _ignored(n, config)}
    problems = []
    if missing := expected.keys() - present.keys():
        problems.append(f"missing {len(missing)} tensor(s): {_names(missing)}")
    if unexpected := present.keys() - expected.keys():
        problems.append(f"unexpected {len(unexpected)} tensor(s): {_names(unexpected)}")
    wrong = [
        f"{n} {present[n]} (config implies {expected[n]})"
        for n in sorted(expected.keys() & present.keys())
        if present[n] != tuple(expected[n])
    ]
    if wrong:
        problems.append(f"{len(wrong)} tensor(s) with the wrong shape: {_names(wrong, 3)}")
    if problems:
        raise CheckpointError(f"{source}: " + "; ".join(problems))


def model_from_tensors(
    config: LlamaConfig,
    shapes: Mapping[str, tuple[int, ...]],
    read: Callable[[str], "np.ndarray | jax.Array"],
    *,
    dtype=jnp.bfloat16,
    source: str = "checkpoint",
    progress: bool = True,
) -> LlamaForCausalLM:
    """Build the model from Hugging Face-named tensors: ``shapes`` lists them, ``read(name)`` loads one.

    Every converter in ``llama_jax.convert`` ends here, after renaming its tensors to Hugging Face's
    names and layouts.
    """
    check_tensors(config, shapes, source)
    graphdef, state = nnx.split(_abstract_model(config, dtype))
    filled = []
    for path, variable in tqdm(nnx.to_flat_state(state), desc="loading weights", disable=not progress, leave=False):
        tensor = jnp.asarray(read(hf_name(path)), dtype=dtype)
        filled.append((path, variable.replace(tensor.T if path[-1] == "kernel" else tensor)))
    return nnx.merge(graphdef, nnx.from_flat_state(filled))


def hf_tensors(model: LlamaForCausalLM) -> dict[str, np.ndarray]:
    """The model's parameters under Hugging Face names and layouts (numpy, the model's dtype)."""
    tensors = {}
    for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        value = np.asarray(variable.get_value())
        tensors[hf_name(path)] = np.ascontiguousarray(value.T) if path[-1] == "kernel" else value
    return tensors


def safetensors_files(directory: str) -> list[str]:
    """The checkpoint's weight files: those named by model.safetensors.index.json, else every *.safetensors."""
    index = os.path.join(directory, "model.safetensors.index.json")
    if os.path.exists(index):
        try:
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index} is not a valid safetensors index ({e})") from None
        files = sorted(set(weight_map.values()))
        if absent := [f for f in files if not os.path.exists(os.path.join(directory, f))]:
            raise CheckpointError(f"{index} names shard(s) that are not there: {_names(absent)}")
    else:
        files = sorted(f for f in os.listdir(directory) if f.endswith(".safetensors"))
    if not files:
        raise CheckpointError(f"no *.safetensors weight files in {directory}")
    return [os.path.join(directory, f) for f in files]


def load_safetensors(directory: str, config: LlamaConfig, *, dtype=jnp.bfloat16, progress=True) -> LlamaForCausalLM:
    """Read a (single-file or sharded) safetensors checkpoint one tensor at a time into the model."""
    from safetensors import safe_open

    handles, shapes = {}, {}
    for path in safetensors_files(directory):
        try:
            handle = safe_open(path, framework="flax")
        except Exception as e:  # safetensors raises its own error types for corrupt headers
            raise CheckpointError(f"cannot read {path}: {e}") from None
        for name in handle.keys():
            if name in handles:
                raise CheckpointError(f"tensor {name} appears in two files of {directory}")
            handles[name] = handle
            shapes[name] = tuple(handle.get_slice(name).get_shape())
    return model_from_tensors(
        config, shapes, lambda n: handles[n].get_tensor(n), dtype=dtype, source=directory, progress=progress
    )


def from_pretrained(path_or_repo_id: str | os.PathLike, dtype=jnp.bfloat16, *, progress: bool = True) -> LlamaForCausalLM:
    """Load a Hugging Face Llama checkpoint: a local directory, or a hub repo id such as
    ``"meta-llama/Llama-3.2-1B"`` (downloaded with ``huggingface_hub``; the token comes from the
    ``HF_TOKEN`` environment variable or ``huggingface-cli login``)."""
    from .checkpoints import resolve_checkpoint

    directory = resolve_checkpoint(path_or_repo_id)
    config = LlamaConfig.from_hf(directory)
    return load_safetensors(directory, config, dtype=dtype, progress=progress)

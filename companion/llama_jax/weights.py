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

import functools
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from tqdm.auto import tqdm

from .config import CheckpointError, LlamaConfig
from .model import LlamaForCausalLM
from .quantize import is_quantized, set_module
from .sharding import TENSOR_PARALLEL, Rules, partition_specs


def hf_name(path: tuple) -> str:
    """NNX path -> Hugging Face tensor name: (..., 'q_proj', 'kernel') -> '....q_proj.weight'."""
    return ".".join(str(step) for step in path[:-1]) + ".weight"


class _OneKey:
    """Stands in for ``nnx.Rngs`` while only shapes are traced: every initializer gets the same key.

    With a real ``nnx.Rngs``, each draw updates a traced counter, and JAX scans the whole trace so far
    at every update (building an error message it then drops): slow for deep models."""

    def params(self) -> jax.Array:
        return jax.random.key(0)


def _abstract_model(config: LlamaConfig, dtype) -> LlamaForCausalLM:
    """The model's structure and parameter shapes, with no memory allocated for the parameters."""
    graphdef, state = _abstract_split(config, jnp.dtype(dtype))
    return nnx.merge(graphdef, state)


@functools.lru_cache(maxsize=16)
def _abstract_split(config: LlamaConfig, dtype: jnp.dtype):
    """(graphdef, abstract state) of the model, built once per (config, dtype) and process."""
    return nnx.split(nnx.eval_shape(lambda: LlamaForCausalLM(config, dtype=dtype, rngs=_OneKey())))


def expected_tensors(config: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor a Hugging Face checkpoint of this config holds, with its (PyTorch-layout) shape."""
    return {name: shape[::-1] if kernel else shape for name, shape, kernel in _parameters(config)}


def parameter_shapes(config: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """Every parameter's shape as the model holds it (kernels (in, out)), by Hugging Face name."""
    return {name: shape for name, shape, _ in _parameters(config)}


@functools.lru_cache(maxsize=16)
def _parameters(config: LlamaConfig) -> tuple[tuple[str, tuple[int, ...], bool], ...]:
    """(Hugging Face name, parameter shape, is a kernel) of every parameter. Cached: even an abstract
    model is slow to build for a deep config."""
    _, state = _abstract_split(config, jnp.dtype(jnp.float32))
    return tuple(
        (hf_name(path), tuple(variable.get_value().shape), path[-1] == "kernel")
        for path, variable in nnx.to_flat_state(state)
    )


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
    read: Callable[[str], np.ndarray | jax.Array],
    *,
    dtype=jnp.bfloat16,
    source: str = "checkpoint",
    progress: bool | None = None,
    mesh: Mesh | None = None,
    rules: Rules = TENSOR_PARALLEL,
    read_slice: Callable[[str, tuple[slice, ...]], np.ndarray] | None = None,
    modules: Mapping[str, nnx.Module] | None = None,
) -> LlamaForCausalLM:
    """Build the model from Hugging Face-named tensors: ``shapes`` lists them, ``read(name)`` loads one.

    Every converter in ``llama_jax.convert`` ends here, after renaming its tensors to Hugging Face's
    names and layouts. With a ``mesh``, each parameter is split over the devices by ``rules`` (see
    ``llama_jax.sharding``) and each device's block is built on its own; ``read_slice(name, index)``,
    when given, reads just that block of a tensor (in Hugging Face's layout) instead of all of it.
    ``modules`` maps Hugging Face module names to modules built already (quantized ones, from GGUF's
    blocks): they go in at those paths, and their tensors are never read.
    """
    check_tensors(config, shapes, source)
    modules = dict(modules or {})
    if modules and mesh is not None:
        raise CheckpointError(f"{source}: quantized weights cannot be sharded over a mesh yet")
    dtype = jnp.dtype(dtype)
    graphdef, state = _abstract_split(config, dtype)
    specs = None if mesh is None else partition_specs(config, parameter_shapes(config), mesh, rules)
    filled = []
    if progress is None:  # a bar on a terminal only: a log file would get a stream of carriage returns
        progress = sys.stderr.isatty()
    for path, variable in tqdm(
        nnx.to_flat_state(state), desc="loading weights", disable=not progress, leave=False
    ):
        name, kernel = hf_name(path), path[-1] == "kernel"
        if name.removesuffix(".weight") in modules:  # left abstract: replaced below, never allocated
            filled.append((path, variable))
            continue
        if specs is None:
            tensor = read(name)
            if isinstance(tensor, np.ndarray):  # one copy: transposed and converted on the way in
                value = jax.device_put((tensor.T if kernel else tensor).astype(dtype, copy=False))
            else:
                tensor = jnp.asarray(tensor, dtype=dtype)
                value = tensor.T if kernel else tensor
        else:
            if read_slice is None:
                whole = np.asarray(read(name))
                read_block = lambda index, whole=whole: whole[index]
            else:
                read_block = lambda index, name=name: read_slice(name, index)
            sharding = NamedSharding(mesh, specs[name])
            value = _sharded_parameter(variable.get_value().shape, sharding, kernel, read_block, dtype)
        filled.append((path, variable.replace(value)))
    model = nnx.merge(graphdef, nnx.from_flat_state(filled))
    for module_name, module in modules.items():
        set_module(model, module_name, module)
    return model


def _sharded_parameter(shape, sharding, kernel: bool, read_block, dtype) -> jax.Array:
    """A parameter built device by device: each device's block is read (a kernel's (in, out) block is the
    transpose of the (out, in) block of the Hugging Face tensor) and placed on that device alone."""

    def block(index: tuple[slice, ...]) -> np.ndarray:
        data = np.asarray(read_block(index[::-1] if kernel else index))
        return (data.T if kernel else data).astype(dtype)

    return jax.make_array_from_callback(shape, sharding, block)


def hf_tensors(model: LlamaForCausalLM) -> dict[str, np.ndarray]:
    """The model's parameters under Hugging Face names and layouts (numpy, the model's dtype)."""
    if nnx.to_flat_state(nnx.state(model, nnx.LoRAParam)):
        raise CheckpointError(
            "the model has LoRA adapters: save them with llama_jax.save_adapter, or merge them first "
            "(llama_jax.merge_lora(model))"
        )
    if is_quantized(model):
        raise CheckpointError(
            "the model is quantized: a Hugging Face checkpoint holds float weights; load the float model "
            "to save it (or merge_lora(model, dtype=...) for a dense copy)"
        )
    tensors = {}
    for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        value = np.asarray(variable.get_value())
        tensors[hf_name(path)] = np.ascontiguousarray(value.T) if path[-1] == "kernel" else value
    return tensors


def safetensors_files(directory: str) -> list[str]:
    """The checkpoint's weight files: those named by model.safetensors.index.json, else every ``*.safetensors``."""
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


def load_safetensors(
    directory: str,
    config: LlamaConfig,
    *,
    dtype=jnp.bfloat16,
    progress: bool | None = None,
    mesh: Mesh | None = None,
    rules: Rules = TENSOR_PARALLEL,
) -> LlamaForCausalLM:
    """Read a (single-file or sharded) safetensors checkpoint one tensor at a time into the model; with
    a ``mesh``, each device reads only its own block of each tensor (``get_slice``)."""
    from safetensors import safe_open

    handles, shapes = {}, {}
    for path in safetensors_files(directory):
        try:
            handle = safe_open(path, framework="numpy")
        except Exception as e:  # safetensors raises its own error types for corrupt headers
            raise CheckpointError(f"cannot read {path}: {e}") from None
        for name in handle.keys():
            if name in handles:
                raise CheckpointError(f"tensor {name} appears in two files of {directory}")
            handles[name] = handle
            shapes[name] = tuple(handle.get_slice(name).get_shape())
    return model_from_tensors(
        config,
        shapes,
        lambda n: handles[n].get_tensor(n),
        dtype=dtype,
        source=directory,
        progress=progress,
        mesh=mesh,
        rules=rules,
        read_slice=lambda n, index: handles[n].get_slice(n)[index],
    )


def _parse_size(size: int | str) -> int:
    """Bytes from an int or a string like transformers' ``max_shard_size``: "5GB" (10**9), "500MiB" (2**20)."""
    if isinstance(size, int):
        return size
    units = {
        "B": 1,
        "KB": 10**3,
        "MB": 10**6,
        "GB": 10**9,
        "TB": 10**12,
        "KIB": 2**10,
        "MIB": 2**20,
        "GIB": 2**30,
    }
    text = str(size).strip().upper()
    number = text.rstrip("KMGTIB")
    unit = text[len(number) :].strip() or "B"
    try:
        return int(float(number) * units[unit])
    except (ValueError, KeyError):
        raise ValueError(
            f"max_shard_size={size!r}: expected bytes or a size such as '5GB' or '500MiB'"
        ) from None


def save_pretrained(
    model: LlamaForCausalLM,
    directory: str | os.PathLike,
    max_shard_size: int | str = "5GB",
    *,
    overwrite: bool = False,
    tokenizer=None,
) -> str:
    """Write ``model`` as a Hugging Face checkpoint that transformers (and ``from_pretrained``) load:
    ``config.json`` (``config.to_hf()``) and ``model.safetensors``, or, when the tensors exceed
    ``max_shard_size``, ``model-0000i-of-0000n.safetensors`` shards with ``model.safetensors.index.json``.
    Tensors keep the model's dtype. ``tokenizer`` (a transformers tokenizer), if given, is saved too.

    Everything is written into a temporary directory beside the target, which is then renamed into
    place: an interrupted export never leaves a half-written checkpoint. An existing non-empty target
    is refused unless ``overwrite=True``. Returns the directory.
    """
    from safetensors.numpy import save_file

    target = os.path.abspath(os.fspath(directory))
    if os.path.isfile(target):
        raise CheckpointError(f"{target} is a file, not a directory")
    if os.path.isdir(target) and os.listdir(target) and not overwrite:
        raise CheckpointError(f"{target} already exists and is not empty; pass overwrite=True to replace it")
    limit = _parse_size(max_shard_size)

    tensors = hf_tensors(model)
    shards: list[list[str]] = [[]]
    shard_bytes = 0
    for name, tensor in tensors.items():  # fill shards in order; a tensor over the limit gets one to itself
        if shards[-1] and shard_bytes + tensor.nbytes > limit:
            shards.append([])
            shard_bytes = 0
        shards[-1].append(name)
        shard_bytes += tensor.nbytes

    parent = os.path.dirname(target)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(target)}-", dir=parent)
    try:
        config = model.config.to_hf()
        config["dtype"] = str(tensors["model.norm.weight"].dtype)
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(config, f, indent=2)
        if len(shards) == 1:
            save_file(tensors, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        else:
            weight_map = {}
            for i, names in enumerate(shards, start=1):
                filename = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
                save_file(
                    {n: tensors[n] for n in names}, os.path.join(tmp, filename), metadata={"format": "pt"}
                )
                weight_map.update({n: filename for n in names})
            index = {
                "metadata": {"total_size": sum(t.nbytes for t in tensors.values())},
                "weight_map": weight_map,
            }
            with open(os.path.join(tmp, "model.safetensors.index.json"), "w") as f:
                json.dump(index, f, indent=2)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        for name in os.listdir(tmp):  # safetensors writes its files private (0600), mkdtemp the directory
            if os.path.isfile(os.path.join(tmp, name)):
                os.chmod(os.path.join(tmp, name), 0o644)
        os.chmod(tmp, 0o755)
        if os.path.isdir(target):  # empty, or overwrite=True: move the old one aside, then swap
            old = tempfile.mkdtemp(prefix=f".{os.path.basename(target)}-old-", dir=parent)
            try:
                os.replace(target, os.path.join(old, "old"))
                try:
                    os.replace(tmp, target)
                except OSError:
                    os.replace(os.path.join(old, "old"), target)  # put the previous checkpoint back
                    raise
            finally:
                shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already after a successful rename
    return target


def read_tensor(checkpoint: str | os.PathLike, name: str) -> np.ndarray:
    """One tensor of a Hugging Face checkpoint directory by its name, as the file stores it: numpy, in
    PyTorch's layout and the file's dtype (bfloat16 as ``ml_dtypes.bfloat16``). Chapter 2's ``read``.

    The file that holds it is the one ``model.safetensors.index.json`` names, when there is an index,
    else the first ``*.safetensors`` file whose header lists it; only that tensor's bytes are read.
    A missing directory, file or tensor raises a one-line ``CheckpointError``."""
    from safetensors import safe_open

    directory = os.fspath(checkpoint)
    if not os.path.isdir(directory):
        raise CheckpointError(f"cannot read tensor {name}: no checkpoint directory {directory}")
    index = os.path.join(directory, "model.safetensors.index.json")
    if os.path.exists(index):
        try:
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index} is not a valid safetensors index ({e})") from None
        files = [weight_map[name]] if name in weight_map else []
    else:
        files = sorted(f for f in os.listdir(directory) if f.endswith(".safetensors"))
    for file in files:
        path = os.path.join(directory, file)
        if not os.path.exists(path):
            raise CheckpointError(f"cannot read tensor {name}: {index} names {file}, which is not there")
        try:
            with safe_open(path, framework="numpy") as f:
                if name in f.keys():
                    return f.get_tensor(name)
        except Exception as e:  # safetensors raises its own error types for corrupt files
            raise CheckpointError(f"cannot read tensor {name} from {path}: {e}") from None
    raise CheckpointError(f"no tensor {name} in {directory}")

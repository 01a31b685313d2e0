"""Sharding rules: which slice of each parameter lives on which device.

A *mesh* arranges the devices in a grid with named axes: ``"batch"`` (data parallel: each device row
holds other examples) and ``"model"`` (tensor parallel: each device column holds part of every
weight), as in Keras's ``DeviceMesh((2, 4), ["batch", "model"])``.

*Rules* say how each tensor is cut: an ordered list of (regular expression over the Hugging Face tensor
name, ``PartitionSpec``), the first match wins, like Keras's ``LayoutMap``. A spec names, for each axis
of the parameter *as llama_jax holds it* (kernels (in, out), the embedding (V, H)), the mesh axis it
is split over, or None. The model itself knows nothing of this: the loader places every tensor by the
rules (``from_pretrained(..., mesh=...)``) and ``generate`` shards the batch and the KV cache to match.

``TENSOR_PARALLEL`` (the default, Megatron-style): q/k/v/gate/up split their output features over
``"model"`` and o/down their input features, so each layer needs one all-reduce after attention and
one after the MLP; the vocabulary is split too. ``FSDP`` (for training) also splits each weight's other
dimension over ``"batch"``, so no device holds a whole weight.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from .config import ConfigError, LlamaConfig

Rules = Sequence[tuple[str, P]]

_COLUMN = r"model\.layers\.\d+\.(self_attn\.(q|k|v)_proj|mlp\.(gate|up)_proj)\.weight"  # output features
_ROW = r"model\.layers\.\d+\.(self_attn\.o_proj|mlp\.down_proj)\.weight"  # input features

TENSOR_PARALLEL: Rules = (
    (_COLUMN, P(None, "model")),
    (_ROW, P("model", None)),
    (r"model\.embed_tokens\.weight", P("model", None)),  # (V, H): the vocabulary
    (r"lm_head\.weight", P(None, "model")),  # (H, V) kernel: the vocabulary
    (r".*norm\.weight", P()),
)

FSDP: Rules = (
    (_COLUMN, P("batch", "model")),
    (_ROW, P("model", "batch")),
    (r"model\.embed_tokens\.weight", P("model", "batch")),
    (r"lm_head\.weight", P("batch", "model")),
    (r".*norm\.weight", P()),
)

# The KV cache, [B, K, S, D]: examples over "batch", key/value heads over "model".
KV_CACHE = P("batch", "model", None, None)


def make_mesh(batch: int = 1, model: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ``("batch", "model")`` mesh of ``batch * model`` devices (the first ones of ``jax.devices()``
    unless ``devices`` is given), with Auto axes: XLA propagates the shardings through the program."""
    if batch < 1 or model < 1:
        raise ConfigError(f"mesh batch={batch}, model={model}: both sizes must be >= 1")
    available = list(jax.devices()) if devices is None else list(devices)
    if batch * model > len(available):
        raise ConfigError(
            f"mesh batch={batch} x model={model} needs {batch * model} devices; {len(available)} are available"
        )
    auto = (jax.sharding.AxisType.Auto,) * 2
    return jax.make_mesh(
        (batch, model), ("batch", "model"), axis_types=auto, devices=available[: batch * model]
    )


def parse_mesh(text: str) -> dict[str, int]:
    """``"batch=2,model=4"`` -> ``{"batch": 2, "model": 4}`` (the CLI's ``--mesh``)."""
    sizes = {}
    for part in text.split(","):
        name, _, size = part.partition("=")
        if name.strip() not in ("batch", "model") or not size.strip().isdigit():
            raise ConfigError(f"--mesh {text!r}: expected e.g. batch=1,model=2 (axes 'batch' and 'model')")
        sizes[name.strip()] = int(size)
    return sizes


def spec_for(name: str, rules: Rules) -> P:
    """The PartitionSpec of the first rule whose pattern matches the whole name; replicated if none."""
    for pattern, spec in rules:
        if re.fullmatch(pattern, name):
            return spec
    return P()


def _axis_size(mesh: Mesh, axes) -> int:
    if axes is None:
        return 1
    names = (axes,) if isinstance(axes, str) else tuple(axes)
    return math.prod(mesh.shape[a] for a in names)


def _units(name: str, axis: int, size: int, config: LlamaConfig) -> tuple[int, str]:
    """How many indivisible pieces dimension ``axis`` of parameter ``name`` has: whole heads for the
    attention projections' head dimension, single features elsewhere."""
    if (name.endswith("q_proj.weight") and axis == 1) or (name.endswith("o_proj.weight") and axis == 0):
        return config.num_attention_heads, f"{config.num_attention_heads} query heads"
    if name.endswith(("k_proj.weight", "v_proj.weight")) and axis == 1:
        return config.num_key_value_heads, f"{config.num_key_value_heads} key/value heads"
    return size, f"{size}"


def partition_specs(
    config: LlamaConfig, shapes: Mapping[str, tuple[int, ...]], mesh: Mesh, rules: Rules = TENSOR_PARALLEL
) -> dict[str, P]:
    """Every parameter's PartitionSpec, by Hugging Face name (``shapes``: the parameters' shapes as
    llama_jax holds them), after checking that the mesh cuts no dimension unevenly and no attention head
    in two: a ConfigError names the tensor, the dimension, the axis size and the sizes that would work."""
    specs, cuts = {}, []  # cuts: (name, dimension, mesh axes, indivisible units, description)
    for name, shape in shapes.items():
        specs[name] = spec = spec_for(name, rules)
        if len(spec) > len(shape):
            raise ConfigError(
                f"rule for {name}: {spec} has more entries than the tensor's {len(shape)} dimensions"
            )
        cuts += [
            (name, axis, axes, *_units(name, axis, shape[axis], config))
            for axis, axes in enumerate(spec)
            if axes is not None
        ]
    for name, axis, axes, units, what in cuts:
        n = _axis_size(mesh, axes)
        if units % n:
            common = math.gcd(*(u for _, _, other, u, _ in cuts if other == axes))
            sizes = [d for d in range(1, common + 1) if common % d == 0]
            raise ConfigError(
                f"{name}: dimension {axis} ({what}) cannot be split evenly over mesh axis {axes!r} of size {n}; "
                f"sizes of {axes!r} that work for this model: {sizes}"
            )
    return specs


def kv_cache_sharding(config: LlamaConfig, mesh: Mesh) -> NamedSharding:
    """Where the KV cache lives: batch over "batch" and key/value heads over "model" (replicated over
    "model" if the heads do not divide, which the default rules already refuse)."""
    heads = "model" if config.num_key_value_heads % _axis_size(mesh, "model") == 0 else None
    return NamedSharding(mesh, P("batch", heads, None, None))


def split_rows(mesh: Mesh, *arrays: np.ndarray) -> list[jax.Array]:
    """Host arrays [B, ...] as global arrays split over the mesh's "batch" axis (B must be a multiple of
    it). Each process builds only its own devices' rows, so this works in a multi-process job too."""
    rows = NamedSharding(mesh, P("batch"))
    return [jax.make_array_from_callback(a.shape, rows, lambda index, a=a: a[index]) for a in arrays]


def mesh_of(tree) -> Mesh | None:
    """The mesh the arrays of ``tree`` (a model, or its state) are sharded over, or None on one device."""
    if jax.device_count() == 1:  # no mesh to find: skip the walk over every array (per train step)
        return None
    for leaf in jax.tree.leaves(tree):
        sharding = getattr(leaf, "sharding", None)
        if isinstance(sharding, NamedSharding) and sharding.mesh.size > 1:
            return sharding.mesh
    return None


def host_value(array) -> np.ndarray:
    """The whole value of ``array`` on this host. A replicated array of a multi-process job spans devices
    this process cannot read, but every one of its own devices holds the whole value: read the first."""
    if isinstance(array, jax.Array) and not array.is_fully_addressable:
        if not array.is_fully_replicated:
            raise ValueError(
                f"an array sharded over other processes' devices ({array.sharding}) is not here whole"
            )
        return np.asarray(array.addressable_data(0))
    return np.asarray(array)

"""LoRA adapters: a trainable low-rank update beside frozen projection weights, in peft's file format.

``add_lora(model, rank, alpha)`` swaps each targeted ``nnx.Linear`` (``q_proj``, ..., ``down_proj``) for a
``LoRALinear`` that keeps the same ``kernel`` Param at the same path, so Hugging Face names still map to
it, and adds ``lora_a`` (in, rank) and ``lora_b`` (rank, out) as ``nnx.LoRAParam`` parameters:

    y = x @ kernel + (x @ lora_a @ lora_b) * alpha / rank

exactly peft's LoRA (``lora_A.weight`` is ``lora_a.T``, ``lora_B.weight`` is ``lora_b.T``). ``lora_b`` starts
at zero, so a fresh adapter changes nothing. The model code itself is untouched.

``save_adapter`` / ``load_adapter`` read and write peft's ``adapter_config.json`` +
``adapter_model.safetensors``; ``merge_lora`` folds the update into the kernels and returns a plain model
that ``save_pretrained`` can write.
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from .cache import hub_id
from .config import ConfigError
from .model import LlamaForCausalLM
from .sharding import host_value, mesh_of

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_PEFT_PREFIX = "base_model.model."
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")  # peft's two files


class AdapterError(ValueError):
    """An adapter that does not fit the model, or a file that is not a LoRA adapter this package reads."""


class LoRALinear(nnx.Module):
    """A projection with a LoRA update. Over an ``nnx.Linear``, ``kernel`` is its own (frozen) Param; over
    any other frozen projection (a quantized one: QLoRA) the module is kept whole, as ``base``, and called."""

    def __init__(self, base: nnx.Module, rank: int, alpha: float, *, key: jax.Array, dtype=jnp.float32):
        if isinstance(base, nnx.Linear):
            in_features, out_features = base.kernel.get_value().shape
            self.kernel = base.kernel  # the same Param, at the same path: Hugging Face names keep working
            self.compute_dtype = base.dtype or base.kernel.get_value().dtype
            self.base = None
        else:
            in_features, out_features = base.in_features, base.out_features
            self.compute_dtype, self.base = base.dtype, base
        self.rank, self.alpha = rank, alpha
        bound = 1 / math.sqrt(in_features)  # peft's default: kaiming_uniform(a=sqrt(5)) on lora_A (r, in)
        self.lora_a = nnx.LoRAParam(jax.random.uniform(key, (in_features, rank), dtype, -bound, bound))
        self.lora_b = nnx.LoRAParam(jnp.zeros((rank, out_features), dtype))

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.base is None:
            y = x.astype(self.compute_dtype) @ self.kernel[...].astype(self.compute_dtype)  # as nnx.Linear
        else:
            y = self.base(x.astype(self.compute_dtype))
        a, b = self.lora_a[...], self.lora_b[...]
        update = lora_update(x.astype(a.dtype), a, b, self.scaling)  # in the adapters' dtype (float32)
        return y + update.astype(y.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def lora_update(x: jax.Array, a: jax.Array, b: jax.Array, scaling: float) -> jax.Array:
    """LoRA's update ``(x @ a @ b) * scaling``, x [..., in], a [in, r], b [r, out] -> [..., out].

    Its gradient is written out (``jax.custom_vjp``) only to choose how the adapters' gradients are
    multiplied: each sums over every token, and from autodiff's order XLA's CPU backend wrote a transposed
    copy of the [tokens, out] output gradient for every projection (a quarter of a SmolLM2 LoRA step). Here
    the large operand comes first, in its own layout, and only the rank-r result is transposed; the
    scaling multiplies rank-r arrays, never a [..., out] one. ``tests/test_lora.py`` compares the
    gradients with autodiff's."""
    return ((x @ a) * scaling) @ b


def _lora_update_forward(x, a, b, scaling):
    h = (x @ a) * scaling  # [..., r]: the scaling on the rank-r side, never on a [..., out] array
    return h @ b, (x, a, b, h)


def _lora_update_backward(scaling, residuals, grad):
    x, a, b, h = residuals  # grad: [..., out]
    grad_h = (grad @ b.T) * scaling  # [..., r]
    tokens = lambda t: t.reshape(-1, t.shape[-1])  # every leading axis is summed over for a and b
    grad_a = jnp.einsum("ni,nr->ri", tokens(x), tokens(grad_h)).T  # [in, r]
    grad_b = jnp.einsum("no,nr->or", tokens(grad), tokens(h)).T  # [r, out]
    return grad_h @ a.T, grad_a, grad_b


lora_update.defvjp(_lora_update_forward, _lora_update_backward)


def _frozen(module: nnx.Module) -> jax.Array:
    """One of a module's frozen arrays (its kernel, or a quantized base's values): where it lives."""
    return jax.tree.leaves(nnx.state(module, nnx.Not(nnx.LoRAParam)))[0]


def _projections(model: LlamaForCausalLM):
    """(layer index, parent module, attribute name) of every projection of every decoder layer."""
    for i, layer in enumerate(model.model.layers):
        for parent in (layer.self_attn, layer.mlp):
            for name in TARGETS:
                if hasattr(parent, name):
                    yield i, parent, name


def _place_like(array: jax.Array, kernel: jax.Array) -> jax.Array:
    """Replicate an adapter array over the kernel's mesh, if the model is sharded."""
    mesh = mesh_of([kernel])
    return array if mesh is None else jax.device_put(array, NamedSharding(mesh, P()))


def add_lora(
    model: LlamaForCausalLM,
    rank: int = 16,
    alpha: float = 32,
    targets: Sequence[str] = TARGETS,
    seed: int = 0,
    dtype=jnp.float32,
) -> LlamaForCausalLM:
    """Add LoRA adapters (in place; returns the model) to the projections named in ``targets``."""
    if rank < 1:
        raise ConfigError(f"LoRA rank must be >= 1, got {rank}")
    if unknown := sorted(set(targets) - set(TARGETS)):
        raise ConfigError(f"LoRA targets {unknown} match no layer; the projections are {list(TARGETS)}")
    key = jax.random.key(seed)
    for _, parent, name in _projections(model):
        base = getattr(parent, name)
        if name not in targets or isinstance(base, LoRALinear):
            continue
        key, subkey = jax.random.split(key)
        adapter = LoRALinear(base, rank, alpha, key=subkey, dtype=dtype)
        kernel = _frozen(adapter)
        adapter.lora_a.set_value(_place_like(adapter.lora_a.get_value(), kernel))
        adapter.lora_b.set_value(_place_like(adapter.lora_b.get_value(), kernel))
        setattr(parent, name, adapter)
    return model


def _adapters(model: LlamaForCausalLM) -> list[tuple[str, LoRALinear]]:
    """(Hugging Face module name, adapter) of every LoRA projection, e.g. 'model.layers.0.self_attn.q_proj'."""
    found = []
    for i, parent, name in _projections(model):
        module = getattr(parent, name)
        if isinstance(module, LoRALinear):
            group = "self_attn" if parent is model.model.layers[i].self_attn else "mlp"
            found.append((f"model.layers.{i}.{group}.{name}", module))
    return found


def trainable_parameters(model: LlamaForCausalLM) -> int:
    """How many numbers the adapters hold (what peft's ``print_trainable_parameters`` calls trainable)."""
    return sum(
        int(np.prod(v.get_value().shape)) for _, v in nnx.to_flat_state(nnx.state(model, nnx.LoRAParam))
    )


def merge_lora(model: LlamaForCausalLM, dtype=None) -> LlamaForCausalLM:
    """A plain model (no adapters) whose kernels are ``kernel + lora_a @ lora_b * alpha / rank``, in the
    model's dtype (or ``dtype``); ``model`` itself is left as it is. A quantized model (QLoRA) needs a
    ``dtype``: its weights are dequantized into a dense model of that dtype."""
    dense = {}  # path -> dequantized weight, for modules that hold their weight quantized
    for path, module in nnx.iter_modules(model):
        if hasattr(module, "dequantize") and hasattr(module, "DENSE"):
            if dtype is None:
                raise AdapterError(
                    "merge_lora: the base model is quantized; pass dtype= (e.g. jnp.bfloat16) for a dense model"
                )
            owner = path[:-1] if path and path[-1] == "base" else path  # a LoRALinear's quantized base
            dense[tuple(owner) + (module.DENSE,)] = module.dequantize(dtype)
    dtype = jnp.dtype(dtype or model.model.norm.weight.get_value().dtype)
    merged = {name: module for name, module in _adapters(model)}
    graphdef, state = nnx.split(
        nnx.eval_shape(lambda: LlamaForCausalLM(model.config, dtype=dtype, rngs=nnx.Rngs(0)))
    )
    source = {
        path: v.get_value()
        for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))
        if not isinstance(v, nnx.LoRAParam)
    }
    source.update(dense)
    filled = []
    for path, variable in nnx.to_flat_state(state):
        value = source[path]
        module = merged.get(".".join(str(step) for step in path[:-1]))
        if module is not None:
            update = (module.lora_a.get_value() @ module.lora_b.get_value()) * module.scaling
            value = value.astype(jnp.float32) + update.astype(jnp.float32)
        filled.append((path, variable.replace(jnp.asarray(value).astype(dtype))))
    return nnx.merge(graphdef, nnx.from_flat_state(filled))


# --------------------------------------------------------------------------------- peft's file format


def save_adapter(
    model: LlamaForCausalLM,
    directory: str | os.PathLike,
    *,
    base_model_name_or_path: str | os.PathLike | None = None,
    overwrite: bool = False,
) -> str:
    """Write the adapters as peft does (``adapter_config.json`` + ``adapter_model.safetensors``), so that
    ``peft.PeftModel.from_pretrained(transformers_model, directory)`` loads them. Written into a temporary
    directory and renamed into place; an existing non-empty ``directory`` is refused unless ``overwrite``,
    which replaces the two files (each by an atomic rename) and leaves anything else there (a training run's
    state) as it is.

    ``base_model_name_or_path`` is written to ``adapter_config.json``, where peft's
    ``AutoPeftModelForCausalLM`` and the Hugging Face Hub look for the base model: give the base model's
    hub id (``"meta-llama/Llama-3.2-1B"``; ``llama_jax.hub_id(checkpoint)`` finds it for a downloaded or
    the bundled checkpoint). A local directory is written as given, with a warning, since an adapter
    that names one loads only on this machine; None (no base named) warns too."""
    from safetensors.numpy import save_file

    adapters = _adapters(model)
    if not adapters:
        raise AdapterError("the model has no LoRA adapters: add_lora(model, ...) first")
    if base_model_name_or_path is None:
        warnings.warn(
            "save_adapter: no base_model_name_or_path, so peft's AutoPeftModelForCausalLM cannot find the "
            "base model; pass its hub id, e.g. base_model_name_or_path='meta-llama/Llama-3.2-1B'",
            UserWarning,
            stacklevel=2,
        )
    elif os.path.isdir(os.path.expanduser(os.fspath(base_model_name_or_path))):
        known = hub_id(base_model_name_or_path)
        warnings.warn(
            f"save_adapter: base_model_name_or_path={os.fspath(base_model_name_or_path)!r} is a local "
            "directory, so the adapter loads only on this machine; pass the base model's hub id"
            + (f" ({known!r} for this one)" if known else ""),
            UserWarning,
            stacklevel=2,
        )
    ranks_alphas = {(m.rank, m.alpha) for _, m in adapters}
    if len(ranks_alphas) > 1:
        raise AdapterError(
            f"adapters with different (rank, alpha) {sorted(ranks_alphas)}: peft's format holds one"
        )
    ((rank, alpha),) = ranks_alphas
    tensors = {}
    for name, module in adapters:
        tensors[f"{_PEFT_PREFIX}{name}.lora_A.weight"] = np.ascontiguousarray(
            host_value(module.lora_a.get_value()).T
        )
        tensors[f"{_PEFT_PREFIX}{name}.lora_B.weight"] = np.ascontiguousarray(
            host_value(module.lora_b.get_value()).T
        )
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": rank,
        "lora_alpha": alpha,
        "lora_dropout": 0.0,
        "target_modules": sorted({name.rsplit(".", 1)[1] for name, _ in adapters}),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "inference_mode": True,
        "base_model_name_or_path": None
        if base_model_name_or_path is None
        else os.fspath(base_model_name_or_path),
        "modules_to_save": None,
    }
    target = os.path.abspath(os.fspath(directory))
    if os.path.isdir(target) and os.listdir(target) and not overwrite:
        raise AdapterError(f"{target} already exists and is not empty; pass overwrite=True to replace it")
    os.makedirs(os.path.dirname(target), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(target)}-", dir=os.path.dirname(target))
    try:
        save_file(tensors, os.path.join(tmp, ADAPTER_FILES[1]), metadata={"format": "pt"})
        os.chmod(os.path.join(tmp, ADAPTER_FILES[1]), 0o644)  # safetensors writes it private (0600)
        with open(os.path.join(tmp, ADAPTER_FILES[0]), "w") as f:
            json.dump(config, f, indent=2)
        os.chmod(tmp, 0o755)
        if os.path.isdir(target):  # each file by an atomic rename; anything else in the directory stays
            for name in reversed(ADAPTER_FILES):
                os.replace(os.path.join(tmp, name), os.path.join(target, name))
        else:
            os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def load_adapter(model: LlamaForCausalLM, directory: str | os.PathLike) -> LlamaForCausalLM:
    """Add the LoRA adapter saved in ``directory`` (peft's format, e.g. by ``PeftModel.save_pretrained``) to
    ``model`` (in place; returns it). Every tensor must fit a projection of the model; anything this package
    cannot reproduce exactly (DoRA, rsLoRA, per-module ranks, biases, extra trained modules) is refused."""
    from safetensors.numpy import load_file

    directory = os.fspath(directory)
    config_path = os.path.join(directory, "adapter_config.json")
    weights_path = os.path.join(directory, "adapter_model.safetensors")
    for path in (config_path, weights_path):
        if not os.path.isfile(path):
            raise AdapterError(f"{directory} is not a peft adapter: {os.path.basename(path)} is missing")
    with open(config_path) as f:
        config = json.load(f)
    if config.get("peft_type") != "LORA":
        raise AdapterError(f"{config_path}: peft_type={config.get('peft_type')!r}; only 'LORA' is supported")
    for field, fine in (
        ("use_dora", False),
        ("use_rslora", False),
        ("bias", "none"),
        ("fan_in_fan_out", False),
    ):
        if config.get(field, fine) != fine:
            raise AdapterError(f"{config_path}: unsupported {field}={config[field]!r}")
    for field in ("rank_pattern", "alpha_pattern", "modules_to_save", "layers_to_transform"):
        if config.get(field):
            raise AdapterError(f"{config_path}: unsupported {field}={config[field]!r}")

    tensors = load_file(weights_path)
    pattern = re.compile(
        re.escape(_PEFT_PREFIX) + r"(model\.layers\.\d+\.(?:self_attn|mlp)\.(\w+))\.lora_([AB])\.weight"
    )
    found: dict[str, dict[str, np.ndarray]] = {}
    for name, tensor in tensors.items():
        match = pattern.fullmatch(name)
        if match is None or match.group(2) not in TARGETS:
            raise AdapterError(f"{weights_path}: tensor {name} fits no projection of a Llama model")
        found.setdefault(match.group(1), {})[match.group(3)] = tensor
    targets = sorted({module.rsplit(".", 1)[1] for module in found})
    add_lora(model, rank=int(config["r"]), alpha=float(config["lora_alpha"]), targets=targets)
    adapters = dict(_adapters(model))
    if missing := sorted(set(adapters) - set(found)):
        raise AdapterError(f"{weights_path}: no adapter for {missing[0]} (and {len(missing) - 1} more)")
    for module_name, pair in found.items():
        module = adapters.get(module_name)
        if module is None:
            raise AdapterError(f"{weights_path}: {module_name} is not in this model")
        if set(pair) != {"A", "B"}:
            raise AdapterError(f"{weights_path}: {module_name} has lora_{''.join(pair)} only")
        for part, variable in (("A", module.lora_a), ("B", module.lora_b)):
            value = pair[part].T
            if value.shape != variable.get_value().shape:
                raise AdapterError(
                    f"{weights_path}: {module_name}.lora_{part}.weight has shape {pair[part].shape}, the model "
                    f"needs {variable.get_value().shape[::-1]} (another base model or rank?)"
                )
            variable.set_value(_place_like(jnp.asarray(value, variable.get_value().dtype), _frozen(module)))
    return model

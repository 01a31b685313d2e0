"""Compiled programs kept on disk whole, so that a new process neither traces nor lowers them again.

JAX's persistent compilation cache (``llama_jax.enable_compilation_cache``) keeps XLA's compiled code,
but a new process must still trace the Python function to a jaxpr and lower it to StableHLO before it
can look the code up: about a second for the two generation programs of a 30-layer model, paid by
every command-line call. ``call(program, *args, **static)`` instead keeps the compiled executable
itself (``jax.experimental.serialize_executable``), once per process in memory and once per machine
under ``<compilation cache>/programs``, under a key that covers everything the program is built from:
this package's source code, the versions of jax, jaxlib and flax, the devices, every JAX setting and
``XLA_FLAGS``, the structure of the arguments (the model's class, config and static attributes
included), the shape, dtype and placement of every argument, and the static arguments. Anything
else (no directory set, a model on a mesh) goes through the jitted function as usual.
``keep(name, parts, build)`` does the same for a plain Python value that is slow to make: the abstract
model ``from_pretrained`` fills.

A file that cannot be read or loaded (from a killed process, an older format) is compiled and
written again; files are written whole (a temporary file, then a rename), never half. These programs
are kept here instead of in JAX's cache, not in both (see ``_load_or_compile``).
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import os
import pickle
import re
import sys
import tempfile

import jax
import numpy as np
from jax.experimental.serialize_executable import deserialize_and_load, serialize

# XLA:CPU settings for the programs compiled here: a fifth less compile time (2.0 instead of 2.3-2.6 s for
# the bundled model's decode program on our 2-core CPU) for the same speed, as their time goes to matrix
# products, which XLA hands to libraries whatever it optimizes itself.
CPU_COMPILER_OPTIONS = {
    "xla_cpu_opt_preset": "CPU_OPT_PRESET_FAST_COMPILE",
    "xla_backend_optimization_level": 1,
}

_directory: str | None = None
_loaded: dict = {}  # (program, structure, avals, static) -> the compiled executable


def enable(directory: str | None) -> None:
    """Keep compiled programs under ``directory`` (None: off, calls go to the jitted functions as usual)."""
    global _directory
    _directory = directory


def call(program, *args, **static):
    """``program(*args, **static)`` for a ``jax.jit`` function whose keyword arguments are its static
    ones, run from the executable kept in memory or on disk when there is one."""
    if _directory is None or static.get("mesh") is not None:
        return program(*args, **static)
    leaves, structure = jax.tree_util.tree_flatten(args)
    # host arrays onto the default device first, like the arrays a program returns, so that a carry
    # made on the host and one returned by the program are the same kind of argument
    leaves = [jax.device_put(leaf) if isinstance(leaf, np.ndarray | np.generic) else leaf for leaf in leaves]
    args = jax.tree_util.tree_unflatten(structure, leaves)
    avals = tuple((jax.typeof(leaf), getattr(leaf, "sharding", None)) for leaf in leaves)
    memory_key = (program, structure, avals, tuple(sorted(static.items())))
    compiled = _loaded.get(memory_key)
    if compiled is None:
        compiled = _load_or_compile(program, args, static, structure, avals)
        _loaded[memory_key] = compiled
    return compiled(*args)


def _load_or_compile(program, args, static, structure, avals):
    devices = {device for _, sharding in avals if sharding is not None for device in sharding.device_set}
    options = CPU_COMPILER_OPTIONS if all(device.platform == "cpu" for device in devices) else None
    key = _disk_key(structure, avals, {**static, "compiler_options": options})
    path = os.path.join(_directory, "programs", f"{program.__name__}-{key}")
    try:
        with open(path, "rb") as f:
            return deserialize_and_load(*pickle.load(f))
    except Exception:  # missing, cut short or from other versions: compile (XLA's cache may still hit)
        pass
    # An executable that JAX read back from its own persistent cache cannot be serialized again (the
    # copy would lack its kernels: "Function ... not found" when run, seen with jaxlib 0.10.2 on CPU).
    # So JAX's cache is kept from storing these programs, and a program it served anyway (stored by
    # an earlier version) is used but not written here.
    served_by_jax_cache = []

    def listen(event, **_):
        if event == "/jax/compilation_cache/cache_hits":
            served_by_jax_cache.append(event)

    minimum = jax.config.jax_persistent_cache_min_compile_time_secs
    jax.monitoring.register_event_listener(listen)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", float("inf"))
    try:
        compiled = program.lower(*args, **static).compile(compiler_options=options)
    finally:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", minimum)
        jax.monitoring.unregister_event_listener(listen)
    if not served_by_jax_cache:
        _write(path, serialize(compiled))
    return compiled


def keep(name: str, parts, build):
    """``build()``, kept on disk (pickled) under ``name`` and a key of ``parts`` plus the environment,
    when a directory is set: for what is slow to make and the same in every process, such as the
    abstract model that ``from_pretrained`` fills (a third of a second of tracing for 30 layers)."""
    if _directory is None:
        return build()
    key = hashlib.sha256(repr([_environment(), parts]).encode()).hexdigest()
    path = os.path.join(_directory, "programs", f"{name}-{key}")
    try:
        with open(path, "rb") as f:
            return pickle.load(f)
    except Exception:  # missing, cut short or from other versions: build it again
        pass
    value = build()
    _write(path, value)
    return value


def _write(path: str, value) -> None:
    """Pickle ``value`` to ``path`` whole: a temporary file in the same folder, then a rename."""
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=os.path.dirname(path), delete=False) as f:
        pickle.dump(value, f)
    os.replace(f.name, path)


def _environment() -> list:
    """What every kept file depends on: this package's code, the libraries, the devices, JAX's settings."""
    settings = sorted((name, repr(value)) for name, value in jax.config.values.items())
    return [
        _source_digest(),
        [importlib.metadata.version(package) for package in ("jax", "jaxlib", "flax")],
        sys.version,
        [(d.platform, d.device_kind) for d in jax.devices()],
        jax.process_count(),
        settings,
        os.environ.get("XLA_FLAGS", ""),
    ]


def _disk_key(structure, avals, static) -> str:
    """sha256 of everything the compiled program depends on (see the module's docstring)."""
    parts = [
        _environment(),
        # functions in the structure print with their address, which changes from process to process
        re.sub(r" at 0x[0-9a-f]+>", ">", str(structure)),
        [(str(aval), str(sharding)) for aval, sharding in avals],
        repr(sorted(static.items())),
    ]
    return hashlib.sha256(repr(parts).encode()).hexdigest()


@functools.cache
def _source_digest() -> str:
    """sha256 of this package's Python files: a changed model or program never reuses old executables."""
    root = os.path.dirname(os.path.abspath(__file__))
    digest = hashlib.sha256()
    for folder, _, files in sorted(os.walk(root)):
        for name in sorted(files):
            if name.endswith(".py"):
                with open(os.path.join(folder, name), "rb") as f:
                    digest.update(name.encode() + f.read())
    return digest.hexdigest()

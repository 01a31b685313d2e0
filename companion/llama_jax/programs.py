"""Compiled programs kept on disk: JAX's persistent compilation cache, and the generation programs
kept whole so that a new process neither traces nor lowers them again.

``enable_compilation_cache()`` turns both on. JAX's cache keeps XLA's compiled code, but a new process
must still trace and lower a function before it can look the code up. ``call(program, *args, **static)``
keeps the compiled executable itself (``jax.experimental.serialize_executable``), in memory and under
``<compilation cache>/programs``, keyed by everything the program is built from (this package's source,
the jax/jaxlib/flax versions, the devices, JAX's settings and ``XLA_FLAGS``, the arguments' structure,
shapes, dtypes and shardings, the static arguments). Only programs whose arguments all sit on one device
are kept; the rest go through the jitted function. ``keep(name, parts, build)`` does the same for a
Python value that is slow to make (the abstract model). bench/CLI_RESULTS.md measures what this adds
over JAX's cache alone.
"""

from __future__ import annotations

import collections
import contextlib
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

from .paths import cache_root

# XLA:CPU settings for the programs compiled here: less compile time for the same speed, as their time
# goes to matrix products, which XLA hands to libraries whatever it optimizes itself.
CPU_COMPILER_OPTIONS = {
    "xla_cpu_opt_preset": "CPU_OPT_PRESET_FAST_COMPILE",
    "xla_backend_optimization_level": 1,
}

MAX_LOADED = 32  # executables held in memory (each holds its compiled code); the oldest goes first

_directory: str | None = None
# (program, structure, avals, static) -> executable, least recently used first
_loaded: collections.OrderedDict = collections.OrderedDict()


def enable_compilation_cache(directory: str | None = None) -> str | None:
    """Keep compiled XLA programs on disk, so a later process (the next CLI call, the next notebook)
    finds them instead of compiling again: JAX's persistent compilation cache in ``directory`` (default
    ``cache_root()/xla``, private to the user), and the generation programs kept whole under
    ``directory/programs`` (``call``), unless ``$LLAMA_JAX_JAX_CACHE_ONLY`` is set.

    Returns the directory, or None when ``$LLAMA_JAX_NO_COMPILATION_CACHE`` is set (to anything but
    "" or "0"): then nothing is changed. Call it before the first compilation; the CLI does.
    """
    if _flag("LLAMA_JAX_NO_COMPILATION_CACHE"):
        return None
    directory = os.path.abspath(directory or os.path.join(cache_root(), "xla"))
    os.makedirs(directory, mode=0o700, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", directory)
    # every program, however quick to compile: the small ones add up at start-up too
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    enable(None if _flag("LLAMA_JAX_JAX_CACHE_ONLY") else directory)
    return directory


def _flag(name: str) -> bool:
    return os.environ.get(name, "") not in ("", "0")


def enable(directory: str | None) -> None:
    """Keep compiled programs under ``directory`` (None: off, calls go to the jitted functions as usual)."""
    global _directory
    _directory = directory


def call(program, *args, **static):
    """``program(*args, **static)`` for a ``jax.jit`` function whose keyword arguments are its static
    ones, run from the executable kept in memory or on disk when there is one."""
    if _directory is None:
        return program(*args, **static)
    leaves, structure = jax.tree_util.tree_flatten(args)
    if not _one_device(leaves):  # a sharded program: its executable is tied to the mesh, so jit keeps it
        return program(*args, **static)
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
        if len(_loaded) > MAX_LOADED:
            _loaded.popitem(last=False)
    else:
        _loaded.move_to_end(memory_key)
    return compiled(*args)


def _one_device(leaves) -> bool:
    """Whether every array argument sits on one and the same device (host values count as the default)."""
    devices = set()
    for leaf in leaves:
        sharding = getattr(leaf, "sharding", None)
        if sharding is not None:
            devices |= sharding.device_set
    return len(devices) <= 1


@contextlib.contextmanager
def _compiling_outside_jax_cache():
    """The process-wide switches while ``call`` compiles, put back after: JAX's persistent cache does not
    store the program, and a hit in it (a program stored by an earlier version) is recorded in the
    list this yields."""
    hits = []

    def listen(event, **_):
        if event == "/jax/compilation_cache/cache_hits":
            hits.append(event)

    minimum = jax.config.jax_persistent_cache_min_compile_time_secs
    jax.monitoring.register_event_listener(listen)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", float("inf"))
    try:
        yield hits
    finally:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", minimum)
        jax.monitoring.unregister_event_listener(listen)


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
    # An executable that JAX read back from its own persistent cache cannot be serialized again: the
    # copy lacks its kernels ("Function ... not found" when run; jaxlib 0.10.2 to 0.12.0.1 on CPU,
    # tests/test_programs.py::test_jaxlib_still_cannot_reserialize_a_cached_executable). So JAX's cache
    # is kept from storing these programs, and one it served anyway is used but not written here.
    with _compiling_outside_jax_cache() as served_by_jax_cache:
        compiled = program.lower(*args, **static).compile(compiler_options=options)
    if not served_by_jax_cache:
        _write(path, serialize(compiled))
    return compiled


def keep(name: str, parts, build):
    """``build()``, kept on disk (pickled) under ``name`` and a key of ``parts`` plus the environment,
    when a directory is set: for what is slow to make and the same in every process, such as the
    abstract model that ``from_pretrained`` fills."""
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

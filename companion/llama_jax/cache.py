"""What the package keeps on disk: the cache root (the bundled model's checkpoint, compiled programs),
and the switch that keeps compiled XLA programs there, JAX's persistent compilation cache."""

from __future__ import annotations

import os


def cache_root() -> str:
    """``$LLAMA_JAX_CACHE``, else ``$XDG_CACHE_HOME/llama_jax``, else ``~/.cache/llama_jax``."""
    if os.environ.get("LLAMA_JAX_CACHE"):
        return os.environ["LLAMA_JAX_CACHE"]
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(xdg, "llama_jax")


def enable_compilation_cache(directory: str | None = None) -> str | None:
    """Keep compiled XLA programs on disk, so a later process (the next CLI call, the next notebook)
    finds them instead of compiling again: JAX's persistent compilation cache, in ``directory``
    (default ``cache_root()/xla``, created private to the user, mode 0700).

    Returns the directory, or None when ``$LLAMA_JAX_NO_COMPILATION_CACHE`` is set (to anything but
    "" or "0"): then nothing is changed. Call it before the first compilation; the CLI does.
    """
    if os.environ.get("LLAMA_JAX_NO_COMPILATION_CACHE", "") not in ("", "0"):
        return None
    import jax

    directory = os.path.abspath(directory or os.path.join(cache_root(), "xla"))
    os.makedirs(directory, mode=0o700, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", directory)
    # every program, however quick to compile: the small ones add up at start-up too
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    return directory

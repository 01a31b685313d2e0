"""Where the package keeps what it makes on disk: ``cache_root()``."""

from __future__ import annotations

import os


def cache_root() -> str:
    """``$LLAMA_JAX_CACHE``, else ``$XDG_CACHE_HOME/llama_jax``, else ``~/.cache/llama_jax``."""
    if os.environ.get("LLAMA_JAX_CACHE"):
        return os.environ["LLAMA_JAX_CACHE"]
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(xdg, "llama_jax")

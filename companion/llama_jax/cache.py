"""What the package keeps on disk: the cache root (the bundled model's checkpoint, compiled programs),
and the switch that keeps compiled XLA programs there, JAX's persistent compilation cache."""

from __future__ import annotations

import os
import re

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"  # the bundled model's checkpoint, under cache_root()
DEFAULT_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # the model the bundled GGUF was made from
REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


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


def hub_id(path_or_repo_id: str | os.PathLike) -> str | None:
    """The Hugging Face Hub id of a checkpoint, for files that must name their base model so that others
    can load it (a peft adapter's ``base_model_name_or_path``), or None when it is not known.

    A repo id (``meta-llama/Llama-3.2-1B``) is returned as it is; a directory of the hub's download cache
    (``.../models--{owner}--{name}/snapshots/{revision}``, what ``resolve_checkpoint`` returns for a repo
    id) gives ``owner/name``; the bundled default checkpoint gives ``HuggingFaceTB/SmolLM2-135M-Instruct``,
    the model its GGUF was made from (its weights are that model's rounded to Q4_1 and dequantized, so
    close to the hub's, not equal); any other directory gives None."""
    name = os.fspath(path_or_repo_id)
    local = os.path.expanduser(name)
    if not os.path.exists(local):
        return name if REPO_ID.match(name) else None
    real = os.path.realpath(local)
    if real == os.path.realpath(os.path.join(cache_root(), DEFAULT_MODEL_NAME)):
        return DEFAULT_HUB_ID
    parts = real.split(os.sep)
    if len(parts) >= 3 and parts[-2] == "snapshots" and parts[-3].startswith("models--"):
        owner, _, repo = parts[-3].removeprefix("models--").partition("--")
        if owner and repo:
            return f"{owner}/{repo}"
    return None

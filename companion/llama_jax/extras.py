"""Optional dependencies, imported only by the functions that need them.

The package alone (``pip install llama_jax``) runs the model without PyTorch; PyTorch comes with the
``reference`` extra, for the comparisons with transformers and the PyTorch-format converters.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import sys

REFERENCE_INSTALL = 'pip install "llama_jax[reference]"'


def import_torch(needed_by: str):
    """``torch``, or a one-line ModuleNotFoundError that says which extra installs it."""
    try:
        import torch
    except ModuleNotFoundError as e:
        if e.name != "torch":  # torch is there but broken: its own error says more
            raise
        raise ModuleNotFoundError(f"{needed_by} needs PyTorch: {REFERENCE_INSTALL}", name="torch") from None
    return torch


def import_transformers():
    """``transformers``, imported without its "PyTorch was not found" notice: without PyTorch the package
    uses it for tokenizers only, where that notice would only puzzle a user of the CLI."""
    if "transformers" in sys.modules:
        return sys.modules["transformers"]
    before = os.environ.get("TRANSFORMERS_NO_ADVISORY_WARNINGS")
    os.environ["TRANSFORMERS_NO_ADVISORY_WARNINGS"] = "1"  # read by transformers' logger at the notice
    try:
        import transformers
    finally:
        if before is None:
            del os.environ["TRANSFORMERS_NO_ADVISORY_WARNINGS"]
        else:
            os.environ["TRANSFORMERS_NO_ADVISORY_WARNINGS"] = before
    return transformers


# The (jax, flax) pairs llama_jax supports, as companion/pyproject.toml declares them: [low, high).
JAX_FLAX_PAIRS = (
    (("0.10.2", "0.11"), ("0.12.8", "0.12.9")),  # Python 3.11: the last pair made for it
    (("0.11.2", "0.13"), ("0.12.10", "0.13")),  # Python 3.12+
)


def _release(version: str) -> tuple[int, ...]:
    """'0.12.0.1' -> (0, 12, 0, 1); a pre-release, dev or local suffix ends it ('0.13.0rc1' -> (0, 13, 0))."""
    numbers = []
    for part in version.split("+")[0].split("."):
        digits = re.match(r"\d+", part)
        if digits is None:
            break
        numbers.append(int(digits.group()))
        if digits.end() < len(part):
            break
    return tuple(numbers)


def check_jax_flax(jax_version: str | None = None, flax_version: str | None = None) -> None:
    """One-line ImportError when the installed (or given) jax and flax are not a supported pair: some
    pairs break at import (flax 0.12.8 under jax 0.11), others deep inside a call."""
    jax_version = jax_version or importlib.metadata.version("jax")
    flax_version = flax_version or importlib.metadata.version("flax")

    def inside(version, bounds):
        return _release(bounds[0]) <= _release(version) < _release(bounds[1])

    if any(inside(jax_version, j) and inside(flax_version, f) for j, f in JAX_FLAX_PAIRS):
        return
    (old_jax, old_flax), (new_jax, new_flax) = JAX_FLAX_PAIRS
    raise ImportError(
        f"llama_jax needs jax>={new_jax[0]},<{new_jax[1]} with flax>={new_flax[0]},<{new_flax[1]} "
        f"(on Python 3.11: jax {old_jax[0]} with flax {old_flax[0]}); this environment has jax "
        f"{jax_version} and flax {flax_version}: pip install -U 'jax>={new_jax[0]},<{new_jax[1]}' "
        f"'flax>={new_flax[0]},<{new_flax[1]}'"
    )

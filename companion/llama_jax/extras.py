"""Optional dependencies, imported only by the functions that need them.

The package alone (``pip install llama_jax``) runs the model without PyTorch; PyTorch comes with the
``reference`` extra, for the comparisons with transformers and the PyTorch-format converters.
"""

from __future__ import annotations

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

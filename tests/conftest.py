"""Shared fixtures: tiny random checkpoints written with transformers, and the bundled SmolLM2.

Every tiny checkpoint is a real Hugging Face directory (config.json + safetensors) made by
transformers' own ``save_pretrained``, so the loader is tested on exactly what it meets in the wild.
Weights are drawn with a larger spread than transformers' default (and the norm weights are
perturbed) so that the logits are O(1) and a wrong norm, head or rotation shows up clearly.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess

os.environ.setdefault("KERAS_BACKEND", "jax")

import jax.numpy as jnp
import numpy as np
import pytest

import llama_jax
from llama_jax.weights import hf_tensors

LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 32.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    # small, so that the scaled band covers frequencies that matter at the tiny test lengths
    "original_max_position_embeddings": 64,
}

BASE = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=2048,
    rms_norm_eps=1e-5,
    bos_token_id=1,
    eos_token_id=2,
    initializer_range=0.1,
)

# name -> (config overrides, save_pretrained kwargs)
TINY_CHECKPOINTS = {
    "llama32_tied": (dict(tie_word_embeddings=True, rope_parameters=LLAMA3_ROPE), {}),
    "untied": (
        dict(tie_word_embeddings=False, rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
        {},
    ),
    "head_dim_32": (dict(tie_word_embeddings=True, head_dim=32, rope_parameters=LLAMA3_ROPE), {}),
    "multi_head": (dict(tie_word_embeddings=False, num_key_value_heads=4, rope_parameters=LLAMA3_ROPE), {}),
    # 8 query heads with 4 or 8 key/value heads: every mesh of 8 devices can split them (test_sharding.py)
    "heads_8_kv_4": (
        dict(
            tie_word_embeddings=True,
            num_attention_heads=8,
            num_key_value_heads=4,
            head_dim=8,
            rope_parameters=LLAMA3_ROPE,
        ),
        {},
    ),
    "heads_8_kv_8": (
        dict(
            tie_word_embeddings=False,
            num_attention_heads=8,
            num_key_value_heads=8,
            head_dim=8,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        ),
        {},
    ),
    # the same model as "untied" (same config and seed), written in several shards with an index
    "sharded": (
        dict(tie_word_embeddings=False, rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
        {"max_shard_size": "100KB"},
    ),
}


def make_tiny_checkpoint(directory, name: str, seed: int = 0) -> str:
    """Write the tiny checkpoint ``name`` (a key of TINY_CHECKPOINTS) into ``directory``."""
    import torch
    import transformers

    overrides, save_kwargs = TINY_CHECKPOINTS[name]
    config = transformers.LlamaConfig(**{**BASE, **overrides})
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, transformers.models.llama.modeling_llama.LlamaRMSNorm):
                module.weight.add_(0.1 * torch.randn_like(module.weight))
    model.save_pretrained(directory, **save_kwargs)
    return str(directory)


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory) -> dict[str, str]:
    """name -> directory, for every tiny checkpoint."""
    root = tmp_path_factory.mktemp("tiny")
    return {name: make_tiny_checkpoint(root / name, name) for name in TINY_CHECKPOINTS}


@pytest.fixture(scope="session")
def smollm2_dir() -> str:
    """The bundled SmolLM2-135M-Instruct as a Hugging Face directory (built once, then cached)."""
    return llama_jax.default_checkpoint()


def torch_model(directory: str):
    """transformers' reference model, float32, eval mode."""
    import torch
    import transformers

    return transformers.LlamaForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()


def torch_logits(model, input_ids, attention_mask=None) -> np.ndarray:
    import torch

    with torch.no_grad():
        kwargs = (
            {} if attention_mask is None else {"attention_mask": torch.as_tensor(np.asarray(attention_mask))}
        )
        return model(torch.as_tensor(np.asarray(input_ids)), **kwargs).logits.numpy()


class Models:
    """Models loaded once per test module, by case: a key of TINY_CHECKPOINTS, or "smollm2"."""

    def __init__(self, tiny_checkpoints: dict[str, str], smollm2_dir: str):
        self.directories = {**tiny_checkpoints, "smollm2": smollm2_dir}
        self.ours, self.theirs = {}, {}

    def __call__(self, case: str):
        """(directory, llama_jax model in float32)."""
        if case not in self.ours:
            directory = self.directories[case]
            self.ours[case] = llama_jax.from_pretrained(directory, dtype=jnp.float32, progress=False)
        return self.directories[case], self.ours[case]

    def reference(self, case: str):
        """transformers' model of the same checkpoint (``torch_model``)."""
        if case not in self.theirs:
            self.theirs[case] = torch_model(self.directories[case])
        return self.theirs[case]


@pytest.fixture(scope="module")
def models(tiny_checkpoints, smollm2_dir) -> Models:
    return Models(tiny_checkpoints, smollm2_dir)


# ---------------------------------------------------------------------------------------------------
# Shared by the converters' tests (test_convert_*.py, test_save_pretrained.py)

TOL = 1e-3
IDS = np.random.RandomState(0).randint(3, 256, (2, 300))  # a few hundred positions: RoPE errors show
# Meta's own llama3 RoPE values (only the factor is not fixed by Meta's code)
META_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}


def max_diff(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32))))


def math_fields(config: llama_jax.LlamaConfig) -> llama_jax.LlamaConfig:
    """The config without the fields that do not change the logits (special tokens, context length),
    and with the epsilon rounded to float32 (GGUF stores it so: 1e-5 reads back as 9.99999975e-06)."""
    return dataclasses.replace(
        config,
        bos_token_id=None,
        eos_token_id=(),
        pad_token_id=None,
        max_position_embeddings=0,
        rms_norm_eps=float(np.float32(config.rms_norm_eps)),
    )


def assert_same_weights(a, b):
    ta, tb = hf_tensors(a), hf_tensors(b)
    assert ta.keys() == tb.keys()
    for name in ta:
        np.testing.assert_array_equal(ta[name], tb[name], err_msg=name)


@pytest.fixture(scope="session")
def meta_like_dir(tmp_path_factory) -> str:
    """A tiny tied Hugging Face checkpoint whose RoPE is one Meta's params.json can express (llama3 with
    Meta's fixed values, factor 8 as for Llama 3.1), written by transformers like conftest's."""
    import torch
    import transformers

    directory = tmp_path_factory.mktemp("meta_like")
    config = transformers.LlamaConfig(
        **{
            **BASE,
            "tie_word_embeddings": True,
            "rope_parameters": META_ROPE,
            "max_position_embeddings": 131072,
        }
    )
    torch.manual_seed(1)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.add_(0.1 * torch.randn_like(param))
    model.save_pretrained(directory)
    return str(directory)


@pytest.fixture(scope="session")
def reference(tiny_checkpoints, meta_like_dir):
    """name -> (transformers model, its logits on IDS), computed once."""
    dirs = {**tiny_checkpoints, "meta_like": meta_like_dir}
    cache = {}

    def get(name):
        if name not in cache:
            model = torch_model(dirs[name])
            cache[name] = (model, torch_logits(model, IDS))
        return cache[name]

    return get


def ours(model, ids=IDS) -> np.ndarray:
    return np.asarray(model(jnp.asarray(ids)))


@pytest.fixture(scope="session")
def tiny_chat_checkpoint(tmp_path_factory, smollm2_dir) -> str:
    """A tiny random model with the bundled SmolLM2's vocabulary, tokenizer and chat template: fine-tuning
    runs (tokenize, train, save, resume, merge) in seconds."""
    import shutil

    import torch
    import transformers

    directory = tmp_path_factory.mktemp("tiny_chat")
    config = transformers.LlamaConfig(
        **{**BASE, "vocab_size": 49152, "bos_token_id": 1, "eos_token_id": 2},
        tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    )
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(directory)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if os.path.exists(os.path.join(smollm2_dir, name)):
            shutil.copy(os.path.join(smollm2_dir, name), directory / name)
    return str(directory)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now (for a jax.distributed coordinator)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_processes(commands: list[list[str]], env: dict, timeout: float) -> list[dict]:
    """Start every command at once (the processes of one jax.distributed job), wait for all of them, and
    return the JSON line each printed last. On a timeout or any failure, no process outlives the test."""
    children = [
        subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        for command in commands
    ]
    try:
        outputs = [child.communicate(timeout=timeout) for child in children]
    finally:
        for child in children:
            child.kill()
            child.wait()
    for child, (_, err) in zip(children, outputs, strict=True):
        assert child.returncode == 0, err[-4000:]
    return [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs]

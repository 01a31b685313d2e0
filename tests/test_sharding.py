"""Sharding (llama_jax.sharding): the rules, and sharded loading and generation on meshes of 8 virtual CPU
devices and across two processes on 127.0.0.1.

The checks that need several devices live in ``sharded_checks.py`` and run in processes of their own, so
that the rest of the suite keeps one device; their figures are printed (``pytest -s`` shows them).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import free_port, run_processes
from jax.sharding import PartitionSpec as P

import llama_jax
from llama_jax.sharding import FSDP, TENSOR_PARALLEL, parse_mesh, partition_specs, spec_for
from llama_jax.weights import parameter_shapes

CHECKS = os.path.join(os.path.dirname(__file__), "sharded_checks.py")
ENV = {**os.environ, "TQDM_DISABLE": "1", "PYTHONUNBUFFERED": "1"}


def run_checks(*args, timeout=900) -> dict:
    result = subprocess.run(
        [sys.executable, CHECKS, *args], capture_output=True, text=True, timeout=timeout, env=ENV
    )
    assert result.returncode == 0, result.stderr[-4000:]
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    print(json.dumps(figures, indent=1))
    return figures


# ---------------------------------------------------------------------------------------------------
# The rules, on one device


def test_default_rules_are_megatron_style():
    assert spec_for("model.layers.3.self_attn.q_proj.weight", TENSOR_PARALLEL) == P(None, "model")
    assert spec_for("model.layers.3.mlp.up_proj.weight", TENSOR_PARALLEL) == P(None, "model")
    assert spec_for("model.layers.3.self_attn.o_proj.weight", TENSOR_PARALLEL) == P("model", None)
    assert spec_for("model.layers.3.mlp.down_proj.weight", TENSOR_PARALLEL) == P("model", None)
    assert spec_for("model.embed_tokens.weight", TENSOR_PARALLEL) == P("model", None)
    assert spec_for("lm_head.weight", TENSOR_PARALLEL) == P(None, "model")
    assert spec_for("model.layers.3.input_layernorm.weight", TENSOR_PARALLEL) == P()
    assert spec_for("model.layers.3.self_attn.k_proj.weight", FSDP) == P("batch", "model")
    assert spec_for("something.else", TENSOR_PARALLEL) == P()  # unmatched: replicated


class FakeMesh:
    """Only the axis sizes matter to the checks."""

    def __init__(self, batch, model):
        self.shape = {"batch": batch, "model": model}


def test_a_mesh_that_cuts_a_head_is_refused_with_the_sizes_that_work():
    smollm2 = llama_jax.LlamaConfig(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=1,
        num_attention_heads=9,
        num_key_value_heads=3,
        head_dim=64,
    )
    shapes = parameter_shapes(smollm2)
    assert partition_specs(smollm2, shapes, FakeMesh(2, 3))["model.layers.0.mlp.up_proj.weight"] == P(
        None, "model"
    )
    with pytest.raises(
        llama_jax.ConfigError,
        match=r"key/value heads\) cannot be split evenly over mesh axis "
        r"'model' of size 2; sizes of 'model' that work for this model: \[1, 3\]",
    ):
        partition_specs(smollm2, shapes, FakeMesh(1, 2))
    llama32 = llama_jax.LlamaConfig.from_hf(llama_jax.LLAMA_3_2_1B)
    with pytest.raises(llama_jax.ConfigError, match=r"that work for this model: \[1, 2, 4, 8\]"):
        partition_specs(llama32, parameter_shapes(llama32), FakeMesh(1, 16))
    with pytest.raises(
        llama_jax.ConfigError, match=r"\(2048\) cannot be split evenly over mesh axis 'batch' of size 3"
    ):
        partition_specs(llama32, parameter_shapes(llama32), FakeMesh(3, 8), FSDP)


def test_mesh_arguments():
    assert parse_mesh("batch=2,model=4") == {"batch": 2, "model": 4}
    for bad in ("batch=2,heads=4", "model=x", "2x4"):
        with pytest.raises(llama_jax.ConfigError, match="expected e.g. batch=1,model=2"):
            parse_mesh(bad)
    with pytest.raises(llama_jax.ConfigError, match="needs 8 devices; 1 are available"):
        llama_jax.make_mesh(batch=2, model=4)


def test_a_mesh_of_one_device_changes_nothing(tiny_checkpoints):
    directory = tiny_checkpoints["heads_8_kv_4"]
    plain = llama_jax.from_pretrained(directory, dtype=jnp.float32, progress=False)
    on_mesh = llama_jax.from_pretrained(
        directory, dtype=jnp.float32, progress=False, mesh=llama_jax.make_mesh()
    )
    ids = np.arange(3, 40)[None]
    np.testing.assert_array_equal(np.asarray(plain(ids)), np.asarray(on_mesh(ids)))
    np.testing.assert_array_equal(
        llama_jax.generate(plain, ids, max_new_tokens=5), llama_jax.generate(on_mesh, ids, max_new_tokens=5)
    )


# ---------------------------------------------------------------------------------------------------
# Several devices, in processes of their own


@pytest.mark.parametrize("name", ["heads_8_kv_4", "heads_8_kv_8"])
def test_tiny_models_on_meshes_of_8_devices(tiny_checkpoints, name):
    """(1,8), (2,4), (8,1) tensor parallel and (2,4) FSDP (a mesh that would cut a head is refused): logits within 1e-4 and the same greedy tokens as on
    one device (3 prompts: padded up to the "batch" axis), every shard 1/N of its parameter, and the loader
    read exactly each device's blocks (checked in sharded_checks.py); LoRA train steps on (2,4) give the
    one-device losses."""
    figures = run_checks("tiny", tiny_checkpoints[name])
    lora = figures.pop("LoRA train step, TP (2,4) vs one device")  # two steps: same losses (1e-5 relative)
    assert lora["largest relative difference"] <= 1e-5
    assert set(figures) == {"TP (1,8)", "TP (2,4)", "TP (8,1)", "FSDP (2,4)"}
    refused = {mesh for mesh, figure in figures.items() if "refused" in figure}
    # 4 key/value heads cannot go 8 ways
    assert refused == ({"TP (1,8)"} if name == "heads_8_kv_4" else set())
    if refused:
        assert (
            "(4 key/value heads) cannot be split evenly over mesh axis 'model' of size 8"
            in figures["TP (1,8)"]["refused"]
        )


def test_bundled_model_on_a_mesh_its_heads_allow(smollm2_dir):
    figures = run_checks("bundled")
    assert figures["TP (1,3)"]["same greedy tokens"] and figures["TP (2,3)"]["same greedy tokens"]
    assert figures["int8 TP (2,3)"]["same greedy tokens as one device"]
    assert figures["int4 TP (2,3)"]["same greedy tokens as one device"]
    assert "sizes of 'model' that work for this model: [1, 3]" in figures["error (1,2)"]
    assert "needs 9 devices; 8 are available" in figures["error (1,9)"]


def test_two_processes_on_loopback_give_the_same_tokens(tiny_checkpoints):
    """jax.distributed over 127.0.0.1: 2 processes x 2 CPU devices, the model split over all 4, each process
    reading only its own devices' blocks; both print the tokens of the one-device run."""
    directory = tiny_checkpoints["heads_8_kv_4"]
    port = free_port()
    results = run_processes(
        [[sys.executable, CHECKS, "process", str(i), "2", str(port), directory] for i in range(2)],
        ENV,
        timeout=300,
    )
    print(json.dumps([{k: v for k, v in r.items() if k != "tokens"} for r in results], indent=1))

    model = llama_jax.from_pretrained(directory, dtype=jnp.float32, progress=False)
    rng = np.random.default_rng(0)
    ids, mask = llama_jax.left_pad(
        [rng.integers(3, model.config.vocab_size, n).tolist() for n in (40, 29, 40)]
    )
    expected = llama_jax.generate(model, ids, mask, max_new_tokens=12).tolist()
    for result in results:
        assert result["devices"] == 4 and result["local devices"] == 2
        assert result["q_proj local shards"] == [[64, 16], [64, 16]]  # 2 of the 4 column blocks of (64, 64)
        assert result["tokens"] == expected

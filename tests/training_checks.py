"""Training checks that need several devices, each run by ``test_train_scale.py`` in a process of its own
(JAX fixes its device count when it starts; the rest of the suite keeps one device):

    python tests/training_checks.py mesh CHECKPOINT DATA OUT                  # 8 virtual CPU devices
    python tests/training_checks.py process I N PORT CHECKPOINT DATA OUT      # process I of N, 2 devices each

A failed check raises; the figures are printed as one JSON line at the end.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time

import jax
from jax_start import start_jax

mode = start_jax(sys.argv)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402
from safetensors.numpy import load_file  # noqa: E402

import llama_jax  # noqa: E402
from llama_jax import cli, train  # noqa: E402
from llama_jax.sharding import FSDP, TENSOR_PARALLEL  # noqa: E402

# The same job in every check: 5 steps at a constant rate, rank 4, 8 rows of at most 64 tokens.
JOB = dict(rank=4, alpha=8.0, steps=5, batch_size=8, learning_rate=1e-2, max_length=64, save_every=5)
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "collective-permute", "all-to-all")


def run(checkpoint, data, output, mesh=None, rules=TENSOR_PARALLEL, **options):
    model = llama_jax.from_pretrained(checkpoint, dtype=jnp.float32, progress=False, mesh=mesh, rules=rules)
    tokenizer = llama_jax.load_tokenizer(checkpoint)
    result = train.finetune(
        model,
        tokenizer,
        data,
        output,
        base=checkpoint,
        progress=False,
        log=lambda line: None,
        **{**JOB, **options},
    )
    return model, result


def adapters(output) -> dict[str, np.ndarray]:
    return load_file(os.path.join(output, "adapter_model.safetensors"))


def bytes_per_device(tree) -> int:
    """The most bytes any one device holds of ``tree``'s arrays."""
    held: dict = {}
    for leaf in jax.tree.leaves(tree):
        for shard in leaf.addressable_shards:
            held[shard.device] = held.get(shard.device, 0) + shard.data.nbytes
    return max(held.values())


def placement(array) -> str:
    """ "P()" for an array replicated over the mesh, the spec otherwise."""
    return str(getattr(array.sharding, "spec", type(array.sharding).__name__))


def collectives(compiled_text: str) -> dict[str, int]:
    return {op: len(re.findall(rf"= \S+ {op}(-start)?\(", compiled_text)) for op in COLLECTIVES}


def compiled_step(model, optimizer, batch):
    return train.lower_train_step(model, optimizer, *batch).compile()


def mesh_checks(checkpoint: str, data: str, out: str) -> dict:
    reference_model, reference = run(checkpoint, data, os.path.join(out, "one"))
    expected = adapters(os.path.join(out, "one"))
    figures: dict = {"one device": {"losses": reference.losses}}
    train_file, _ = llama_jax.data.data_files(data)
    dataset = llama_jax.data.load_dataset(train_file, llama_jax.load_tokenizer(checkpoint), JOB["max_length"])
    batch = llama_jax.data.batch_at(dataset, 0, JOB["batch_size"])
    for name, shape, rules in (("TP (4,2)", (4, 2), TENSOR_PARALLEL), ("FSDP (4,2)", (4, 2), FSDP)):
        mesh = llama_jax.make_mesh(batch=shape[0], model=shape[1])
        output = os.path.join(out, name.split()[0])
        model, result = run(checkpoint, data, output, mesh=mesh, rules=rules)
        got = adapters(output)
        loss_rel = max(abs(a - b) / abs(b) for a, b in zip(result.losses, reference.losses, strict=True))
        adapter_diff = max(float(np.abs(got[k] - expected[k]).max()) for k in expected)
        moved = max(float(np.abs(expected[k]).max()) for k in expected if "lora_B" in k)  # B starts at 0
        optimizer = train.lora_optimizer(model, JOB["learning_rate"])
        text = compiled_step(model, optimizer, batch).as_text()
        train.train_step(model, optimizer, *batch)  # placements as the compiled step leaves them
        lora_specs = {placement(v.get_value()) for _, v in nnx.to_flat_state(nnx.state(model, nnx.LoRAParam))}
        opt_specs = {placement(leaf) for leaf in jax.tree.leaves(nnx.state(optimizer))}
        kernel = model.model.layers[0].mlp.down_proj.kernel.get_value()
        figures[name] = {
            "losses": result.losses,
            "largest relative loss difference": loss_rel,
            "adapters max abs diff": adapter_diff,
            "largest lora_B entry (what training moved)": moved,
            "adapter placements": sorted(lora_specs),
            "optimizer-state placements": sorted(opt_specs),
            "down_proj kernel placement": str(kernel.sharding.spec),
            "bytes per device: frozen weights": bytes_per_device(nnx.state(model, nnx.Param)),
            "bytes per device: adapters": bytes_per_device(nnx.state(model, nnx.LoRAParam)),
            "bytes per device: optimizer state": bytes_per_device(nnx.state(optimizer)),
            "collectives in one train step": collectives(text),
        }
        assert loss_rel <= 1e-5 and adapter_diff <= 1e-5 and moved > 1e-3, figures[name]
        assert lora_specs == opt_specs == {str(P())}, figures[name]  # replicated: see train.py
    figures["one device"]["bytes: frozen weights"] = bytes_per_device(nnx.state(reference_model, nnx.Param))

    # gradient checkpointing on the TP mesh: the same losses, less memory for the backward pass
    mesh = llama_jax.make_mesh(batch=4, model=2)
    remat = {}
    for flag in (False, True):
        model = llama_jax.from_pretrained(checkpoint, dtype=jnp.float32, progress=False, mesh=mesh)
        llama_jax.add_lora(model, rank=4, alpha=8)
        model.model.gradient_checkpointing = flag
        optimizer = train.lora_optimizer(model, 1e-2)
        memory = compiled_step(model, optimizer, batch).memory_analysis()
        losses, began = [], time.perf_counter()
        for _ in range(3):
            losses.append(train.train_step(model, optimizer, *batch))
        remat[flag] = {
            "temp bytes per device": int(memory.temp_size_in_bytes),
            "3 steps, s": round(time.perf_counter() - began, 3),
            "losses": losses,
        }
    figures["remat (TP 4,2)"] = {"off": remat[False], "on": remat[True]}
    assert max(abs(a - b) for a, b in zip(remat[False]["losses"], remat[True]["losses"], strict=True)) <= 1e-5
    assert remat[True]["temp bytes per device"] < remat[False]["temp bytes per device"], figures[
        "remat (TP 4,2)"
    ]

    # a batch the mesh cannot split: one line, from the command line
    code = cli.main(
        [
            "finetune",
            "--model",
            checkpoint,
            "--data",
            data,
            "--output",
            os.path.join(out, "bad"),
            "--batch",
            "6",
        ]
        + ["--mesh", "batch=4,model=2", "--steps", "1"]
    )
    assert code == 2 and not os.path.exists(os.path.join(out, "bad", train.RUN_FILE))
    return figures


def process_checks(checkpoint: str, data: str, out: str) -> dict:
    """Process I of N on a (N, 2) mesh: the batch's rows over "batch", one row of the mesh per process."""
    rows_built = []
    real_batch_at = train.batch_at

    def counting_batch_at(*args, **kwargs):
        batch = real_batch_at(*args, **kwargs)
        rows_built.append(batch[0].shape[0])
        return batch

    train.batch_at = counting_batch_at  # what finetune calls: record how many rows this process builds
    mesh = llama_jax.make_mesh(batch=jax.process_count(), model=2)
    _, result = run(checkpoint, data, out, mesh=mesh)
    return {
        "process": jax.process_index(),
        "devices": jax.device_count(),
        "local devices": jax.local_device_count(),
        "rows built per step": sorted(set(rows_built)),
        "losses": result.losses,
        "held-out": result.held_out,
    }


if __name__ == "__main__":
    if mode == "mesh":
        result = mesh_checks(*sys.argv[2:5])
    else:
        result = process_checks(*sys.argv[5:8])
        jax.distributed.shutdown()
    print(json.dumps(result))

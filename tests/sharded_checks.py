"""Checks that need several devices, each run by ``test_sharding.py`` in a process of its own (JAX fixes
its device count when it starts, and the rest of the suite keeps one device):

    python tests/sharded_checks.py tiny CHECKPOINT            # 8 virtual CPU devices
    python tests/sharded_checks.py bundled                    # 8 virtual CPU devices
    python tests/sharded_checks.py process I N PORT CHECKPOINT  # process I of N, 2 devices each, on 127.0.0.1

A failed check raises; the figures are printed as one JSON line at the end.
"""

from __future__ import annotations

import json
import sys

import jax
from jax_start import start_jax

mode = start_jax(sys.argv)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import safetensors  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import llama_jax  # noqa: E402
from llama_jax.weights import hf_name  # noqa: E402

MESHES = [(1, 8), (2, 4), (8, 1)]
forward = nnx.jit(lambda model, ids, mask: model(ids, mask))


def prompts(vocab: int) -> tuple[np.ndarray, np.ndarray]:
    """Three prompts (not a multiple of every "batch" axis), one of them left-padded."""
    rng = np.random.default_rng(0)
    ids, mask = llama_jax.left_pad([rng.integers(3, vocab, n).tolist() for n in (40, 29, 40)])
    return ids, mask


class BytesRead:
    """Wraps safetensors.safe_open to record the size of every block the loader reads, by tensor, and to
    fail on a whole-tensor read."""

    def __init__(self):
        self.blocks = {}  # Hugging Face name -> [bytes of each block read]
        self._open = safetensors.safe_open
        counter = self

        class Slice:
            def __init__(self, inner, name):
                self.inner, self.name = inner, name

            def get_shape(self):
                return self.inner.get_shape()

            def __getitem__(self, index):
                block = self.inner[index]
                counter.blocks.setdefault(self.name, []).append(block.nbytes)
                return block

        class Handle:
            def __init__(self, inner):
                self.inner = inner

            def keys(self):
                return self.inner.keys()

            def get_slice(self, name):
                return Slice(self.inner.get_slice(name), name)

            def get_tensor(self, name):
                raise AssertionError(f"a sharded load read the whole of {name}")

        safetensors.safe_open = lambda *args, **kwargs: Handle(self._open(*args, **kwargs))

    def close(self):
        safetensors.safe_open = self._open


def check_shards(model, mesh, rules, blocks: dict) -> int:
    """Every parameter's local shards hold 1/N of its bytes (N = the devices it is split over), and the
    loader read it in blocks of exactly that size, at most one per device. Returns the bytes read."""
    for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        array, name = variable.get_value(), hf_name(path)
        spec = llama_jax.sharding.spec_for(name, rules)
        assert array.sharding.spec == spec, (name, array.sharding.spec, spec)
        pieces = int(np.prod([mesh.shape[axis] for axis in spec if axis is not None]))
        for shard in array.addressable_shards:
            assert shard.data.nbytes * pieces == array.nbytes, (name, shard.data.shape, array.shape)
        assert blocks[name] and set(blocks[name]) == {array.nbytes // pieces}, (name, blocks[name], pieces)
        assert len(blocks[name]) <= mesh.size, (name, len(blocks[name]))
    return sum(sum(sizes) for sizes in blocks.values())


def tiny(checkpoint: str) -> dict:
    reference = llama_jax.from_pretrained(checkpoint, dtype=jnp.float32, progress=False)
    ids, mask = prompts(reference.config.vocab_size)
    ref_logits = np.asarray(forward(reference, ids, mask))
    ref_tokens = llama_jax.generate(reference, ids, mask, max_new_tokens=12)
    figures = {}
    for (batch, model_axis), rules in [
        *((m, llama_jax.TENSOR_PARALLEL) for m in MESHES),
        ((2, 4), llama_jax.FSDP),
    ]:
        mesh = llama_jax.make_mesh(batch=batch, model=model_axis)
        name = f"{'FSDP' if rules is llama_jax.FSDP else 'TP'} ({batch},{model_axis})"
        if reference.config.num_key_value_heads % model_axis:  # would cut a key/value head in two
            try:
                llama_jax.from_pretrained(checkpoint, progress=False, mesh=mesh, rules=rules)
            except llama_jax.ConfigError as e:
                figures[name] = {"refused": str(e)}
                continue
            raise AssertionError(
                f"{name} was accepted with {reference.config.num_key_value_heads} key/value heads"
            )
        counter = BytesRead()
        try:
            sharded = llama_jax.from_pretrained(
                checkpoint, dtype=jnp.float32, progress=False, mesh=mesh, rules=rules
            )
        finally:
            counter.close()
        bytes_read = check_shards(sharded, mesh, rules, counter.blocks)
        logits_diff = float(np.abs(np.asarray(forward(sharded, ids, mask)) - ref_logits).max())
        tokens = llama_jax.generate(sharded, ids, mask, max_new_tokens=12)
        figures[name] = {
            "logits max abs diff": logits_diff,
            "bytes read": bytes_read,
            "same greedy tokens": bool(np.array_equal(tokens, ref_tokens)),
        }
        assert logits_diff <= 1e-4 and np.array_equal(tokens, ref_tokens), (name, figures[name])
    figures["LoRA train step, TP (2,4) vs one device"] = lora_steps(
        checkpoint, llama_jax.make_mesh(batch=2, model=4)
    )
    return figures


def lora_steps(checkpoint: str, mesh) -> dict:
    """Two LoRA train steps on a sharded model give the losses of the same steps on one device."""
    rng = np.random.default_rng(1)
    ids, mask = llama_jax.left_pad([rng.integers(3, 200, n).tolist() for n in (32, 25, 32, 30)])
    loss_mask = np.zeros_like(mask)
    loss_mask[:, -12:] = 1
    losses = []
    for on in (None, mesh):
        model = llama_jax.from_pretrained(checkpoint, dtype=jnp.float32, progress=False, mesh=on)
        llama_jax.add_lora(model, rank=4, alpha=8)
        optimizer = llama_jax.train.lora_optimizer(model, 1e-2)
        steps = [llama_jax.train.train_step(model, optimizer, ids, mask, loss_mask) for _ in range(2)]
        losses.append([*steps, llama_jax.train.evaluate(model, ids, mask, loss_mask)])
    relative = max(abs(a - b) / abs(a) for a, b in zip(*losses, strict=True))
    assert relative <= 1e-5 and losses[0][2] < losses[0][0], losses
    return {
        "losses (one device)": losses[0],
        "losses (mesh)": losses[1],
        "largest relative difference": relative,
    }


def bundled() -> dict:
    checkpoint = llama_jax.default_checkpoint()
    tokenizer = llama_jax.load_tokenizer(checkpoint)
    texts = ["The capital of France is", "Once upon a time, a dragon", "def fibonacci(n):"]
    reference = llama_jax.from_pretrained(checkpoint, dtype=jnp.float32, progress=False)
    ids, mask = llama_jax.encode_prompts(tokenizer, texts)
    ref_logits = np.asarray(forward(reference, ids, mask))
    ref_tokens = llama_jax.generate(reference, ids, mask, max_new_tokens=16)
    figures = {}
    for batch, model_axis in [(1, 3), (2, 3)]:
        mesh = llama_jax.make_mesh(batch=batch, model=model_axis)
        sharded = llama_jax.from_pretrained(checkpoint, dtype=jnp.float32, progress=False, mesh=mesh)
        logits_diff = float(np.abs(np.asarray(forward(sharded, ids, mask)) - ref_logits).max())
        tokens = llama_jax.generate(sharded, ids, mask, max_new_tokens=16)
        figures[f"TP ({batch},{model_axis})"] = {
            "logits max abs diff": logits_diff,
            "largest logit": float(np.abs(ref_logits).max()),
            "same greedy tokens": bool(np.array_equal(tokens, ref_tokens)),
        }
        # 30 layers of reductions split three ways: a little more rounding than the tiny models' 1e-4
        assert logits_diff <= 1e-3 and np.array_equal(tokens, ref_tokens), figures
    # quantizing a sharded model keeps each weight's cut: the integers and scales of q_proj split by
    # output rows, o_proj's by input columns, and the tokens are the one-device quantized model's
    for settings in (dict(bits=8), dict(bits=4, group_size=32)):
        plain = llama_jax.quantize(
            llama_jax.from_pretrained(checkpoint, dtype=jnp.float32, progress=False),
            embeddings=True,
            **settings,
        )
        sharded = llama_jax.quantize(
            llama_jax.from_pretrained(checkpoint, dtype=jnp.float32, progress=False, mesh=mesh),
            embeddings=True,
            **settings,
        )
        attention = sharded.model.layers[0].self_attn
        specs = {
            name: getattr(attention, name).qvalue.get_value().sharding.spec for name in ("q_proj", "o_proj")
        }
        assert specs == {"q_proj": P("model"), "o_proj": P(None, "model")}, specs
        want = llama_jax.generate(plain, ids, mask, max_new_tokens=16)
        got = llama_jax.generate(sharded, ids, mask, max_new_tokens=16)
        figures[f"int{settings['bits']} TP (2,3)"] = {
            "same greedy tokens as one device": bool(np.array_equal(got, want))
        }
        assert np.array_equal(got, want), figures
    # a converter places its tensors by the same rules (the GGUF holds the bundled model's weights)
    from_gguf = llama_jax.convert.from_gguf(
        llama_jax.checkpoints.bundled_gguf_path(), dtype=jnp.float32, progress=False, mesh=mesh
    )
    assert from_gguf.model.layers[0].mlp.down_proj.kernel.get_value().sharding.spec == P("model", None)
    gguf_diff = float(np.abs(np.asarray(forward(from_gguf, ids, mask)) - ref_logits).max())
    figures["from_gguf TP (2,3)"] = {"logits max abs diff": gguf_diff}
    assert gguf_diff <= 1e-3, figures
    for batch, model_axis in [(1, 2), (1, 9)]:
        try:
            llama_jax.from_pretrained(
                checkpoint, progress=False, mesh=llama_jax.make_mesh(batch=batch, model=model_axis)
            )
        except llama_jax.ConfigError as e:
            figures[f"error ({batch},{model_axis})"] = str(e)
        else:
            raise AssertionError(f"a ({batch},{model_axis}) mesh was accepted")
    return figures


def process(checkpoint: str) -> dict:
    mesh = llama_jax.make_mesh(batch=1, model=jax.device_count())
    model = llama_jax.from_pretrained(checkpoint, dtype=jnp.float32, progress=False, mesh=mesh)
    local = {
        hf_name(path): [s.data.shape for s in v.get_value().addressable_shards]
        for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))
    }
    ids, mask = prompts(model.config.vocab_size)
    tokens = llama_jax.generate(model, ids, mask, max_new_tokens=12)
    return {
        "process": jax.process_index(),
        "devices": jax.device_count(),
        "local devices": jax.local_device_count(),
        "q_proj local shards": [list(s) for s in local["model.layers.0.self_attn.q_proj.weight"]],
        "tokens": tokens.tolist(),
    }


if __name__ == "__main__":
    if mode == "tiny":
        result = tiny(sys.argv[2])
    elif mode == "bundled":
        result = bundled()
    else:
        result = process(sys.argv[5])
        jax.distributed.shutdown()
    print(json.dumps(result))

"""Where a decode step's time goes: one ``generate`` call traced with ``jax.profiler``, its kernels counted.

    python bench/decode_profile.py --model DIR [--dtype bfloat16] [--batch 1] [--new-tokens 64]
    python bench/decode_profile.py --dtype float32 --quantize int8    # the bundled model, int8 weights
    python bench/decode_profile.py --model DIR --framework keras_hub   # keras-hub's generate, the same way
    python bench/decode_profile.py --model DIR --framework llama_jax_fixed  # a loop with no early stop

After warm calls, one call of ``llama_jax.generate`` (a prompt of ``--prompt-tokens`` tokens,
``--new-tokens`` new ones, EOS off) runs under ``jax.profiler.trace``; with ``--framework keras_hub``,
one of keras-hub's ``Llama3CausalLM.generate`` instead (set up as ``bench/generate.py`` sets it up; a
JAX program too, so its operations are counted alike). ``--framework llama_jax_fixed`` runs the same
model in an experiment of this script's: greedy prefill and decode in one program whose loop has a
fixed trip count (``fori_loop``), with no stop test that depends on the tokens. ``generate``'s loop
stops when every row has ended, so XLA's GPU runtime reads that condition back to the host at every
step; the experiment shows what a decode step costs without that read. The trace is read back with
``jax.profiler.ProfileData``. On a GPU the kernels are the events of the device's stream lines; on a
CPU, the XLA operations run by XLA's thread pools. Printed (and written to ``--output`` as markdown):
kernels and device-busy time per new token, against the wall time per new token. Busy time well below
the wall time means the device waits between kernels (launch gaps, host work); busy time near it means
the kernels themselves bound the step (at batch 1, reading the weights: the roofline).
"""

from __future__ import annotations

import argparse
import collections
import functools
import glob
import os
import re
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from generate import LABELS, same_prefix, setup_keras_hub  # bench/generate.py: keras-hub set up as it does
from jax.profiler import ProfileData

import llama_jax

os.environ.setdefault("KERAS_BACKEND", "jax")  # before keras-hub is imported
FRAMEWORKS = {name: LABELS[name] for name in ("llama_jax", "keras_hub")}
FRAMEWORKS["llama_jax_fixed"] = "llama_jax's model in a decode loop of fixed length (no early stop)"

# events of XLA's CPU thread pools that are not operations: bookkeeping, and the "end: dot.3" marker
# an operation run asynchronously leaves when it completes (counting those doubled the count)
CPU_BOOKKEEPING = (
    "ThunkExecutor::Execute",
    "ThreadpoolListener::",
    "SlinkyThreadPool::",
    "end: ",
)
# control flow, whose event spans the operations of its body: counting it would count them twice
CPU_CONTROL_FLOW = re.compile(r"(while|conditional|call)(\.\d+)?$")


def kernel_events(profile: ProfileData) -> list[tuple[str, float]]:
    """(name, duration in ns) of every kernel (GPU) or XLA operation (CPU) in the trace."""
    events = []
    for plane in profile.planes:
        if plane.name.startswith("/device:"):  # a GPU: its streams; "XLA Modules"/"XLA Ops" repeat them
            for line in plane.lines:
                if line.name.startswith("Stream"):
                    events += [(e.name, e.duration_ns) for e in line.events]
        elif plane.name == "/host:CPU" and not any(p.name.startswith("/device:") for p in profile.planes):
            for line in plane.lines:
                if line.name.startswith("tf_XLA"):
                    events += [
                        (e.name, e.duration_ns)
                        for e in line.events
                        if not e.name.startswith(CPU_BOOKKEEPING) and not CPU_CONTROL_FLOW.match(e.name)
                    ]
    return events


def profile_decode(generate, ids: np.ndarray, new_tokens: int) -> dict:
    """Trace one ``generate(ids, new_tokens)`` call (EOS off) after warming it and the 1-token call."""
    for _ in range(2):  # compile, then one warm call
        generate(ids, new_tokens)
    generate(ids, 1)  # the 1-token call may be a program of its own: warm it too
    start = time.perf_counter()
    generate(ids, 1)
    ttft = time.perf_counter() - start
    directory = tempfile.mkdtemp(prefix="decode-profile-")
    with jax.profiler.trace(directory):
        start = time.perf_counter()
        generate(ids, new_tokens)
        wall = time.perf_counter() - start
    (path,) = glob.glob(os.path.join(directory, "**", "*.xplane.pb"), recursive=True)
    events = kernel_events(ProfileData.from_file(path))
    totals = collections.defaultdict(lambda: [0, 0.0])
    for name, ns in events:
        totals[name][0] += 1
        totals[name][1] += ns
    busy = sum(ns for _, ns in events) / 1e9
    return {"wall": wall, "ttft": ttft, "kernels": len(events), "busy": busy, "totals": dict(totals)}


def fixed_length_generate(model):
    """``generate(ids, n)`` for ``--framework llama_jax_fixed``: greedy, no EOS, a cache of exactly
    prompt + n slots, the n - 1 decode steps in a ``fori_loop`` of static length."""

    @functools.partial(jax.jit, static_argnames="new_tokens")
    def run(model, ids, new_tokens):
        batch, prompt = ids.shape
        dtype = model.model.norm.weight[...].dtype
        cache = llama_jax.KVCache.zeros(model.config, batch, prompt + new_tokens, dtype)
        kv_mask = jnp.broadcast_to(jnp.arange(prompt + new_tokens) < prompt, (batch, prompt + new_tokens))
        hidden, cache = model.model(ids, kv_mask, cache, 0)
        token = jnp.argmax(model.logits(hidden[:, -1]), axis=-1).astype(jnp.int32)
        out = jnp.zeros((batch, new_tokens), jnp.int32).at[:, 0].set(token)

        def step(i, carry):  # token i + 1 from token i, which goes to cache slot prompt + i
            token, cache, kv_mask, out = carry
            kv_mask = jax.lax.dynamic_update_slice_in_dim(kv_mask, jnp.ones((batch, 1), bool), prompt + i, 1)
            hidden, cache = model.model(token[:, None], kv_mask, cache, prompt + i)
            token = jnp.argmax(model.logits(hidden[:, 0]), axis=-1).astype(jnp.int32)
            return token, cache, kv_mask, jax.lax.dynamic_update_slice_in_dim(out, token[:, None], i + 1, 1)

        return jax.lax.fori_loop(0, new_tokens - 1, step, (token, cache, kv_mask, out))[3]

    return lambda ids, n: np.asarray(run(model, ids, n))


def report(args, result, backend: str) -> str:
    n = args.new_tokens
    decode_wall = result["wall"] - result["ttft"]
    lines = [
        f"# Decode profile: {FRAMEWORKS[args.framework]}, "
        f"{os.path.basename(os.path.normpath(args.model))}, {args.dtype}"
        + (f", {args.quantize} weights" if args.quantize else "")
        + f", batch {args.batch}"
        + (f", XLA_FLAGS={os.environ['XLA_FLAGS']}" if os.environ.get("XLA_FLAGS") else ""),
        "",
        f"- {backend}: {jax.devices()[0].device_kind}; jax {jax.__version__}",
        f"- one generate call: {args.prompt_tokens} prompt tokens, {n} new tokens, traced with jax.profiler",
        "",
        "| per new token | value |",
        "|---|---|",
        f"| wall time (whole call / new tokens) | {1e6 * result['wall'] / n:.0f} us |",
        f"| wall time of decode (call - TTFT) / (new tokens - 1) | {1e6 * decode_wall / max(n - 1, 1):.0f} us |",
        f"| {'kernels' if backend == 'gpu' else 'XLA operations'} | {result['kernels'] / n:.1f} |",
        f"| device busy (sum of their durations) | {1e6 * result['busy'] / n:.0f} us |",
        f"| busy / wall | {result['busy'] / result['wall']:.0%} |",
        "",
    ]
    kinds = collections.defaultdict(lambda: [0, 0.0])  # "dot.12", "dot.40", ... -> "dot"
    for name, (count, ns) in result["totals"].items():
        kind = kinds[re.sub(r"\.\d+$", "", name)]
        kind[0] += count
        kind[1] += ns
    for table, title in ((result["totals"], "kernels"), (kinds, "kinds of kernel (instances summed)")):
        lines += [
            f"| top {title} by time | count / token | us / token | share of busy |",
            "|---|---|---|---|",
        ]
        for name, (count, ns) in sorted(table.items(), key=lambda item: -item[1][1])[:12]:
            share = ns / 1e9 / result["busy"] if result["busy"] else 0
            lines.append(f"| `{name[:70]}` | {count / n:.1f} | {ns / 1e3 / n:.1f} | {share:.0%} |")
        lines.append("")
    lines += [
        "On a CPU, XLA's operations overlap on several threads, so busy time can exceed the wall time.",
    ]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model", help="a Hugging Face Llama checkpoint directory (default: the bundled model)"
    )
    parser.add_argument("--framework", default="llama_jax", choices=list(FRAMEWORKS))
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument(
        "--quantize",
        choices=["int8", "int4", "gguf"],
        help="as the CLI's --quantize: int8 per channel or int4 in groups of 32 (embedding included), or gguf: "
        "the bundled GGUF's own blocks kept",
    )
    parser.add_argument("--output", help="also write the report to this markdown file")
    args = parser.parse_args(argv)
    args.model = args.model or llama_jax.default_checkpoint()
    if args.framework == "keras_hub":
        if args.quantize:
            parser.error("--quantize is for llama_jax only")
        config = llama_jax.LlamaConfig.from_hf(args.model)
        generate = setup_keras_hub(args.model, config, args.dtype, jax.default_backend() == "gpu")
    else:
        model = load_llama_jax(args)
        config = model.config

        def generate(ids, n):
            return llama_jax.generate(model, ids, max_new_tokens=n, eos_token_id=[])

        if args.framework == "llama_jax_fixed":  # the experiment, checked against generate's tokens
            reference = generate
            generate = fixed_length_generate(model)

    ids = np.random.default_rng(0).integers(3, config.vocab_size, (args.batch, args.prompt_tokens))
    ids = ids.astype(np.int32)
    result = profile_decode(generate, ids, args.new_tokens)
    text = report(args, result, jax.default_backend())
    if args.framework == "llama_jax_fixed":
        ours, theirs = generate(ids, args.new_tokens)[0], reference(ids, args.new_tokens)[0]
        same = same_prefix(ours.tolist(), theirs.tolist())
        text += (
            f"\nSame greedy tokens as `llama_jax.generate` (first row, before the first difference): "
            f"{same}/{args.new_tokens}. Random weights make near-ties, where a different fusion may round "
            "the other way.\n"
        )
    print(text)
    if args.output:
        with open(args.output, "w") as f:
            f.write(text)


def load_llama_jax(args):
    if args.quantize == "gguf":
        gguf = llama_jax.checkpoints.bundled_gguf_path()
        model = llama_jax.convert.from_gguf(gguf, args.dtype, progress=False, keep_quantized=True)
    else:
        model = llama_jax.from_pretrained(args.model, dtype=args.dtype)
    if args.quantize in ("int8", "int4"):
        bits, group_size = (8, None) if args.quantize == "int8" else (4, 32)
        llama_jax.quantize(model, bits=bits, group_size=group_size, embeddings=True)
    return model


if __name__ == "__main__":
    sys.exit(main())

"""Generation benchmark: llama_jax against transformers, keras-hub and the naive full-recompute loop.

    python bench/generate.py                        # the bundled SmolLM2-135M-Instruct, float32 on CPU
    python bench/generate.py --model DIR            # any local Hugging Face Llama checkpoint
    python bench/generate.py --random-llama-3.2-1b  # random weights in Llama 3.2 1B's shape (for a GPU)

Every framework generates greedily from the same prompts (identical token ids, same length in every
row, so nobody pads) with EOS turned off, so each produces exactly the same number of tokens:

* TTFT: a separate call that generates 1 new token (prefill + the first token).
* decode tokens/s: batch * (new_tokens - 1) / (time of the full call - TTFT).
* compile: the first full call minus the best warm full call (jit tracing and XLA compilation).
* Times are the best of ``--repeats`` warm calls.
* peak RSS: each framework runs in its own subprocess (this script with ``--worker``), which reports
  its own ``resource.getrusage`` peak, so the figures do not mix.

The batch-1 roofline: a decode step must read every weight once, so it cannot beat
bandwidth / weight bytes tokens per second. The bandwidth is measured here (a numpy sum over 1 GiB on
one core, and a jitted JAX sum, which uses every core; on a GPU a JAX sum in device memory).
The table, the machine description and the settings are printed and written to bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

FRAMEWORKS = ("llama_jax", "transformers", "keras_hub", "naive")
LABELS = {
    "llama_jax": "llama_jax `generate` (jit, KV cache)",
    "transformers": "transformers `generate` (PyTorch)",
    "keras_hub": "keras-hub `Llama3CausalLM.generate` (JAX)",
    "naive": "llama_jax `generate_naive` (no cache)",
}
HERE = os.path.dirname(os.path.abspath(__file__))

# Plain text to cut the prompts from: row r of a batch is the window starting at token 8 * r.
PASSAGE = (
    "The river starts high in the mountains, where snow melts into small streams that run between "
    "the rocks. Over many miles the streams join, and by the time the water reaches the first town it "
    "is wide enough for boats. People have lived along its banks for thousands of years. They fished, "
    "they farmed the rich soil of the valley, and they built mills that used the current to grind "
    "grain. Today the old mills are museums, and the river carries tourists instead of flour. In "
    "spring the water is high and fast; in late summer it is slow, warm and green, and children swim "
    "near the bridges while their parents sit in the shade of the willow trees and talk about the "
    "weather, the harvest and the price of bread."
)


# ------------------------------------------------------------------------------------ the machine


def publish(text: str, output: str) -> None:
    """Print a benchmark's report and write it to ``output`` (``-``: print only)."""
    print(text)
    if output != "-":
        with open(output, "w") as f:
            f.write(text)
        print(f"written to {output}", file=sys.stderr)


def machine_description() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    versions = {}
    for package in ("jax", "jaxlib", "flax", "numpy", "torch", "transformers", "keras", "keras-hub"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "ram_gib": round(ram, 1),
        "python": platform.python_version(),
        "versions": versions,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "date": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
    }


def measure_bandwidth(on_gpu: bool) -> dict:
    """Memory read bandwidth in GB/s: best of several full reductions of a large float32 array."""
    import jax
    import jax.numpy as jnp

    def best(run, repeats):
        run()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            run()
            times.append(time.perf_counter() - start)
        return min(times)

    total = jax.jit(jnp.sum)
    if on_gpu:
        x = jnp.ones(2**29, jnp.float32)  # 2 GiB in device memory
        seconds = best(lambda: total(x).block_until_ready(), 10)
        return {"device_gbs": x.nbytes / seconds / 1e9, "roofline_gbs": x.nbytes / seconds / 1e9}
    x = np.ones(2**28, np.float32)  # 1 GiB
    one_core = x.nbytes / best(x.sum, 5) / 1e9
    xj = jnp.asarray(x)
    all_cores = x.nbytes / best(lambda: total(xj).block_until_ready(), 5) / 1e9
    return {
        "numpy_1_core_gbs": one_core,
        "jax_all_cores_gbs": all_cores,
        "roofline_gbs": max(one_core, all_cores),
    }


def weight_bytes(config, itemsize: int) -> int:
    """Bytes of weights a decode step reads: every parameter, except the input embedding of an
    untied model (only one row of it is read per token; a tied one is read whole as the head)."""
    from llama_jax.weights import expected_tensors

    skipped = set() if config.tie_word_embeddings else {"model.embed_tokens.weight"}
    shapes = [shape for name, shape in expected_tensors(config).items() if name not in skipped]
    return sum(int(np.prod(shape)) for shape in shapes) * itemsize


# ------------------------------------------------------------------------------------ the inputs


def write_random_llama_1b(directory: str) -> str:
    """A checkpoint of Llama 3.2 1B's exact shape with random bfloat16 weights (no download)."""
    import ml_dtypes
    from safetensors.numpy import save_file

    import llama_jax
    from llama_jax.weights import expected_tensors

    config = llama_jax.LlamaConfig.from_hf(dict(llama_jax.LLAMA_3_2_1B))
    rng = np.random.default_rng(0)
    tensors = {}
    for name, shape in expected_tensors(config).items():
        if name.endswith("norm.weight"):
            tensors[name] = np.ones(shape, ml_dtypes.bfloat16)
        else:
            tensors[name] = (rng.standard_normal(shape, np.float32) * 0.02).astype(ml_dtypes.bfloat16)
    save_file(tensors, os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(dict(llama_jax.LLAMA_3_2_1B), f, indent=2)
    return directory


def has_tokenizer(directory: str) -> bool:
    return any(os.path.exists(os.path.join(directory, f)) for f in ("tokenizer.json", "tokenizer.model"))


def make_prompts(directory: str, config, batch: int, length: int) -> np.ndarray:
    """[batch, length] token ids: windows of PASSAGE with the checkpoint's tokenizer, else random ids."""
    if not has_tokenizer(directory):  # (the random 1B model has none)
        return np.random.default_rng(0).integers(3, config.vocab_size, (batch, length)).astype(np.int32)
    import llama_jax

    ids = llama_jax.load_tokenizer(directory)(PASSAGE)["input_ids"]
    if len(ids) < 8 * (batch - 1) + length:
        raise SystemExit(
            f"--prompt-tokens {length} with batch {batch} needs a longer passage ({len(ids)} tokens)"
        )
    return np.array([ids[8 * row : 8 * row + length] for row in range(batch)], np.int32)


# ------------------------------------------------------------------------------ the frameworks
# Each setup_* loads the model and returns generate(ids [B, P], n) -> new token ids [B, n] (numpy,
# so that the computation has finished when it returns). Greedy, KV cache on, EOS never stops it.


def setup_llama_jax(directory, config, dtype, on_gpu):
    import jax.numpy as jnp

    import llama_jax

    model = llama_jax.from_pretrained(directory, dtype=jnp.dtype(dtype), progress=False)
    return lambda ids, n: llama_jax.generate(model, ids, max_new_tokens=n, eos_token_id=())


def setup_naive(directory, config, dtype, on_gpu):
    import jax.numpy as jnp

    import llama_jax

    model = llama_jax.from_pretrained(directory, dtype=jnp.dtype(dtype), progress=False)
    return lambda ids, n: llama_jax.generate_naive(model, ids, max_new_tokens=n, eos_token_id=())


def setup_transformers(directory, config, dtype, on_gpu):
    import torch
    import transformers

    transformers.utils.logging.disable_progress_bar()
    device = "cuda" if on_gpu else "cpu"
    model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=getattr(torch, dtype))
    model = model.to(device).eval()
    model.generation_config.eos_token_id = None  # generate exactly n tokens, as the others do
    pad = config.pad_token_id if config.pad_token_id is not None else 0

    def generate(ids, n):
        ids = torch.as_tensor(ids, device=device)
        with torch.inference_mode():
            out = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                do_sample=False,
                use_cache=True,
                max_new_tokens=n,
                pad_token_id=pad,
            )
        return out[:, ids.shape[1] :].cpu().numpy()

    return generate


def setup_keras_hub(directory, config, dtype, on_gpu):
    import keras_hub

    # keras-hub's converter ignores rms_norm_eps (it would use 1e-6), and Llama3CausalLM.from_preset
    # does not forward layer_norm_epsilon to its backbone: build the backbone with it. No preprocessor:
    # we feed token ids, padded on the right to the final length; keras-hub fills the masked slots.
    backbone = keras_hub.models.Llama3Backbone.from_preset(
        directory, layer_norm_epsilon=config.rms_norm_eps, dtype=dtype
    )
    model = keras_hub.models.Llama3CausalLM.from_preset(directory, backbone=backbone, preprocessor=None)
    model.compile(sampler="greedy")

    def generate(ids, n):
        batch, length = ids.shape
        token_ids = np.zeros((batch, length + n), np.int32)
        token_ids[:, :length] = ids
        mask = np.zeros((batch, length + n), bool)
        mask[:, :length] = True
        out = model.generate({"token_ids": token_ids, "padding_mask": mask}, stop_token_ids=None)
        return np.asarray(out["token_ids"])[:, length:]

    return generate


SETUPS = {
    "llama_jax": setup_llama_jax,
    "transformers": setup_transformers,
    "keras_hub": setup_keras_hub,
    "naive": setup_naive,
}


# ------------------------------------------------------------------------------ one framework


def timed(generate, ids, n):
    start = time.perf_counter()
    tokens = generate(ids, n)
    return time.perf_counter() - start, tokens


def measure(generate, ids, new_tokens: int, repeats: int) -> dict:
    first, tokens = timed(generate, ids, new_tokens)  # compiles (where there is something to compile)
    if tokens.shape != (ids.shape[0], new_tokens):
        raise RuntimeError(f"expected {new_tokens} new tokens per row, got an array of shape {tokens.shape}")
    generate(ids, 1)  # the 1-token call may be a different program: warm it too
    ttft = min(timed(generate, ids, 1)[0] for _ in range(repeats))
    total = min(timed(generate, ids, new_tokens)[0] for _ in range(repeats))
    batch = ids.shape[0]
    return {
        "ttft_s": ttft,
        "total_s": total,
        "compile_s": max(first - total, 0.0),
        "decode_tok_s": batch * (new_tokens - 1) / (total - ttft) if total > ttft else float("nan"),
        "new_tokens": new_tokens,
        "first_row": tokens[0].tolist(),
    }


def same_prefix(tokens, reference) -> int:
    """How many of ``tokens`` equal ``reference``'s before the first difference (over the shorter one)."""
    n = min(len(tokens), len(reference))
    return next((i for i in range(n) if tokens[i] != reference[i]), n)


def worker(args) -> None:
    """Runs in its own process: load one framework, time every batch size, print one JSON line."""
    os.environ.setdefault("KERAS_BACKEND", "jax")
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # so GPU memory figures mean something
    import llama_jax

    config = llama_jax.LlamaConfig.from_hf(args.model)
    start = time.perf_counter()
    generate = SETUPS[args.worker](args.model, config, args.dtype, args.on_gpu)
    results = {"framework": args.worker, "load_s": time.perf_counter() - start, "batches": {}}
    new_tokens = args.naive_new_tokens if args.worker == "naive" else args.new_tokens
    for batch in args.batch_sizes:
        ids = make_prompts(args.model, config, batch, args.prompt_tokens)
        results["batches"][str(batch)] = measure(generate, ids, new_tokens, args.repeats)
        print(
            f"  {args.worker} batch {batch}: {results['batches'][str(batch)]['decode_tok_s']:.1f} tokens/s",
            file=sys.stderr,
            flush=True,
        )
    results["peak_rss_gb"] = peak_rss_gb()
    if args.on_gpu:
        results["peak_device_gb"] = device_peak_gb(args.worker)
    print("RESULT " + json.dumps(results), flush=True)


def peak_rss_gb() -> float:
    """This process's peak resident memory. getrusage's ru_maxrss survives fork+exec (a child starts
    from its parent's peak), so on Linux read the address space's own high-water mark instead."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) * 1024 / 1e9
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # KiB on Linux


def device_peak_gb(framework: str) -> float | None:
    if framework == "transformers":
        import torch

        return torch.cuda.max_memory_allocated() / 1e9
    import jax

    stats = jax.devices()[0].memory_stats() or {}
    return stats["peak_bytes_in_use"] / 1e9 if "peak_bytes_in_use" in stats else None


def result_of(stdout: str) -> dict | None:
    """A worker's result: the JSON of the last "RESULT " line it printed (None when it printed none)."""
    lines = [line for line in stdout.splitlines() if line.startswith("RESULT ")]
    return json.loads(lines[-1][len("RESULT ") :]) if lines else None


def run_worker(framework: str, args) -> dict | None:
    command = [
        sys.executable,
        os.path.abspath(__file__),
        "--worker",
        framework,
        "--model",
        args.model,
        "--dtype",
        args.dtype,
        "--new-tokens",
        str(args.new_tokens),
        "--naive-new-tokens",
        str(args.naive_new_tokens),
        "--batch-sizes",
        ",".join(map(str, args.batch_sizes)),
        "--prompt-tokens",
        str(args.prompt_tokens),
        "--repeats",
        str(args.repeats),
    ] + (["--on-gpu"] if args.on_gpu else [])
    print(f"{framework}: running", file=sys.stderr, flush=True)
    done = subprocess.run(command, stdout=subprocess.PIPE, text=True)
    result = result_of(done.stdout)
    if done.returncode != 0 or result is None:
        print(f"{framework}: FAILED (exit {done.returncode}); skipped", file=sys.stderr)
        return None
    return result


# ------------------------------------------------------------------------------------ the report


def table(results: list[dict], roofline_tok_s: float) -> str:
    reference = next((r for r in results if r["framework"] == "transformers"), None)
    on_gpu = any("peak_device_gb" in r for r in results)
    header = (
        [
            "framework",
            "batch",
            "TTFT (ms)",
            "decode tok/s",
            "vs transformers",
            "% of roofline",
            "compile (s)",
            "peak RSS (GB)",
        ]
        + (["peak GPU mem (GB)"] if on_gpu else [])
        + ["same tokens as transformers"]
    )
    rows = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for result in results:
        for batch, m in result["batches"].items():
            ref = reference["batches"].get(batch) if reference else None
            speedup = f"{m['decode_tok_s'] / ref['decode_tok_s']:.2f}x" if ref else "-"
            roof = f"{100 * m['decode_tok_s'] / roofline_tok_s:.0f}%" if batch == "1" else "-"
            if ref and result is not reference:
                n = min(len(m["first_row"]), len(ref["first_row"]))
                same = f"{same_prefix(m['first_row'], ref['first_row'])}/{n}"
            else:
                same = "-"
            cells = [
                LABELS[result["framework"]],
                batch,
                f"{1000 * m['ttft_s']:.0f}",
                f"{m['decode_tok_s']:.1f}",
                speedup,
                roof,
                f"{m['compile_s']:.1f}",
                f"{result['peak_rss_gb']:.2f}",
            ]
            if on_gpu:
                peak = result.get("peak_device_gb")
                cells.append("-" if peak is None else f"{peak:.2f}")
            rows.append("| " + " | ".join(cells + [same]) + " |")
    return "\n".join(rows)


def report(args, machine, bandwidth, model_line, weights_gb, roofline_tok_s, results, skipped) -> str:
    versions = ", ".join(f"{k} {v}" for k, v in machine["versions"].items())
    if "numpy_1_core_gbs" in bandwidth:
        bw = (
            f"{bandwidth['numpy_1_core_gbs']:.1f} GB/s on one core (numpy sum over 1 GiB), "
            f"{bandwidth['jax_all_cores_gbs']:.1f} GB/s on all cores (jitted JAX sum); the roofline uses the larger"
        )
    else:
        bw = f"{bandwidth['device_gbs']:.0f} GB/s (jitted JAX sum over 2 GiB in device memory)"
    lines = [
        "# Generation benchmark",
        "",
        f"Produced by `python bench/generate.py {' '.join(sys.argv[1:])}`".rstrip()
        + f" on {machine['date']}.",
        "",
        f"- Machine: {machine['cpu']}, {machine['cores']} cores, {machine['ram_gib']} GiB RAM"
        + (f"; GPU: {args.gpu_name}" if args.on_gpu else "; CPU only"),
        f"- Python {machine['python']}; {versions}",
        f"- XLA_FLAGS: `{machine['xla_flags']}`" if machine["xla_flags"] else "- XLA_FLAGS: (none)",
        f"- Model: {model_line}",
        f"- Prompts: {args.prompt_tokens} tokens per row, the same token ids for every framework; greedy; "
        f"EOS off; {args.new_tokens} new tokens ({args.naive_new_tokens} for the naive loop); best of {args.repeats} warm calls",
        f"- Memory bandwidth: {bw}",
        f"- Batch-1 decode roofline: {weights_gb:.3f} GB of weights per token / {bandwidth['roofline_gbs']:.1f} GB/s "
        f"= **{roofline_tok_s:.1f} tokens/s**",
        "",
        table(results, roofline_tok_s),
        "",
        "TTFT: one call that generates a single token (prefill included). Decode tokens/s: "
        "batch x (new tokens - 1) / (full call - TTFT). Compile: first call - best warm call. "
        "Peak RSS: the framework's own process. Same tokens: how many of the first row's new tokens "
        "equal transformers' before the first difference.",
    ]
    if skipped:
        lines += ["", "Not measured: " + "; ".join(skipped) + "."]
    return "\n".join(lines) + "\n"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    source = parser.add_mutually_exclusive_group()
    source.add_argument(
        "--model", help="a local Hugging Face Llama checkpoint directory (default: the bundled SmolLM2)"
    )
    source.add_argument(
        "--random-llama-3.2-1b",
        dest="random_1b",
        action="store_true",
        help="random weights in Llama 3.2 1B's shape, written to a temporary checkpoint",
    )
    parser.add_argument(
        "--frameworks", default=",".join(FRAMEWORKS), help=f"comma-separated subset of {','.join(FRAMEWORKS)}"
    )
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument(
        "--naive-new-tokens", type=int, default=8, help="the naive loop is O(n^2): fewer tokens"
    )
    parser.add_argument("--batch-sizes", default="1,8")
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3, help="warm calls; the best is reported")
    parser.add_argument("--dtype", help="default: float32 on CPU, bfloat16 on GPU")
    parser.add_argument("--output", default=os.path.join(HERE, "RESULTS.md"), help="'-' to write no file")
    parser.add_argument("--worker", choices=FRAMEWORKS, help=argparse.SUPPRESS)
    parser.add_argument("--on-gpu", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.batch_sizes = [int(b) for b in str(args.batch_sizes).split(",")]
    args.frameworks = [f.strip() for f in args.frameworks.split(",") if f.strip()]
    if unknown := [f for f in args.frameworks if f not in FRAMEWORKS]:
        parser.error(f"unknown framework(s) {', '.join(unknown)}; choose from {', '.join(FRAMEWORKS)}")
    if args.new_tokens < 2 or args.naive_new_tokens < 2:
        parser.error(
            "--new-tokens and --naive-new-tokens must be >= 2 (decode speed needs tokens after the first)"
        )
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # leave the GPU's memory to the workers
    if args.worker:
        return worker(args)
    import jax

    import llama_jax

    args.on_gpu = jax.default_backend() == "gpu"
    args.gpu_name = jax.devices()[0].device_kind if args.on_gpu else None
    args.dtype = args.dtype or ("bfloat16" if args.on_gpu else "float32")
    with tempfile.TemporaryDirectory(prefix="llama-3.2-1b-random-") as scratch:
        if args.random_1b:
            print("writing a random Llama 3.2 1B checkpoint", file=sys.stderr, flush=True)
            args.model = write_random_llama_1b(scratch)
            model_line = f"random weights in Llama 3.2 1B's shape, {args.dtype}"
        else:
            args.model = args.model or llama_jax.default_checkpoint()
            model_line = f"`{os.path.basename(os.path.normpath(args.model))}`, {args.dtype}"
        config = llama_jax.LlamaConfig.from_hf(args.model)
        weights_gb = weight_bytes(config, np.dtype(jax.numpy.dtype(args.dtype)).itemsize) / 1e9
        machine = machine_description()
        results, skipped = [], []
        for framework in args.frameworks:
            result = run_worker(framework, args)
            if result is None:
                skipped.append(f"{LABELS[framework]} (failed; its error is printed above)")
            else:
                results.append(result)
    # after the workers: its big arrays must not sit in memory beside them
    bandwidth = measure_bandwidth(args.on_gpu)
    roofline = bandwidth["roofline_gbs"] / weights_gb
    text = report(args, machine, bandwidth, model_line, weights_gb, roofline, results, skipped)
    publish(text, args.output)


if __name__ == "__main__":
    main()

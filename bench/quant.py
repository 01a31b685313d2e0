"""Quantized weights against float32 on one machine: quality, bytes, decode speed, and llama.cpp.

    python bench/quant.py                  # the bundled SmolLM2-135M-Instruct, with its Q4_1 GGUF kept
    python bench/quant.py --model DIR      # any Hugging Face Llama checkpoint (no GGUF rows)
    python bench/quant.py --variants float32 int8 --batch-sizes 1
    python bench/quant.py --model DIR --dtype bfloat16 --variants float32 bfloat16 int8 "int4 g32"  # a GPU

Each variant runs in its own process (this script with ``--worker``), one after the other, so the
peak memory figures do not mix:

* quality: perplexity of ``llama_jax.data.held_out_text()`` in windows of 256 tokens
  (``llama_jax.train.perplexity``), against transformers' float32 ``LlamaForCausalLM`` on the same
  windows; on the first 256 tokens, the max and mean |logit difference| from llama_jax float32 and the
  share of positions whose most likely next token is float32's; and whether greedy decoding writes
  float32's tokens.
* bytes: the weights the model holds (parameters and ``QuantizedWeight`` arrays; int4 values are held
  one per byte), and the process's peak resident memory.
* speed: ``llama_jax.generate`` at each batch size from the same prompts (``bench/generate.py``'s
  passage, 32 tokens), EOS off: time to first token, decode tokens/s, best of ``--repeats``, and the
  ratio to the dense model in ``--dtype`` (default: float32 on a CPU, bfloat16 on a GPU, as the CLI),
  the dtype the quantized variants compute in.
* llama.cpp, when llama-cpp-python is installed (it builds from source, about 15 minutes on 2 cores;
  not part of ``make install``): the bundled Q4_1 file as shipped, and the same weights rewritten by
  llama.cpp's own ``llama_model_quantize`` as Q8_0 and as float32, batch 1 (llama-cpp-python decodes
  one sequence), ``n_threads`` = the machine's cores.

The table, the machine and the settings are printed and written to ``bench/QUANT_RESULTS.md``. Compare
ratios from one run only: on a shared 2-core machine the figures move by a quarter from run to run.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from generate import (  # noqa: E402
    has_tokenizer,
    machine_description,
    make_prompts,
    measure,
    peak_rss_gb,
    publish,
    result_of,
    same_prefix,
)

# label -> (dtype, or None for --dtype; quantize() settings or None); "gguf" rows load the GGUF file
VARIANTS = {
    "float32": ("float32", None),
    "bfloat16": ("bfloat16", None),
    "int8": (None, dict(bits=8, embeddings=True)),
    "int8, projections only": (None, dict(bits=8)),
    "int4 g32": (None, dict(bits=4, group_size=32, embeddings=True)),
    "int4 g64": (None, dict(bits=4, group_size=64, embeddings=True)),
    "int4 g128": (None, dict(bits=4, group_size=128, embeddings=True)),
    "GGUF kept quantized": (None, "gguf"),
}
LLAMA_CPP_TYPES = ("Q4_1 (the file)", "Q8_0", "F32")
WINDOW = 256


def load_variant(label: str, model_dir: str, gguf_file: str | None, compute_dtype: str):
    """The model of one VARIANTS row (raises QuantizationError for settings the model cannot take)."""
    import llama_jax
    from llama_jax.convert import from_gguf

    dtype, settings = VARIANTS[label]
    dtype = dtype or compute_dtype
    if settings == "gguf":
        return from_gguf(gguf_file, dtype, progress=False, keep_quantized=True)
    model = llama_jax.from_pretrained(model_dir, dtype=dtype, progress=False)
    if settings:
        llama_jax.quantize(model, **settings)
    return model


def weight_bytes(model) -> int:
    import jax
    from flax import nnx

    from llama_jax.quantize import QuantizedWeight

    held = nnx.state(model, nnx.Param), nnx.state(model, QuantizedWeight)
    return sum(leaf.nbytes for state in held for leaf in jax.tree.leaves(state))


def held_out_ids(model_dir: str) -> list[int]:
    """The held-out text as the checkpoint's tokenizer cuts it; a checkpoint without one (the random 1B
    shape) gets 1,500 random ids, which still compare the variants with float32 on the same tokens."""
    import llama_jax

    if not has_tokenizer(model_dir):
        vocab = llama_jax.LlamaConfig.from_hf(model_dir).vocab_size
        return np.random.default_rng(0).integers(3, vocab, 1500).tolist()
    tokenizer = llama_jax.load_tokenizer(model_dir)
    return tokenizer(llama_jax.data.held_out_text(), add_special_tokens=False)["input_ids"]


# ------------------------------------------------------------------------------ the workers


def llama_jax_worker(args) -> dict:
    import jax.numpy as jnp
    from flax import nnx

    import llama_jax
    from llama_jax.quantize import QuantizationError

    try:
        model = load_variant(args.worker, args.model, args.gguf, args.dtype)
    except QuantizationError as error:
        return {"variant": args.worker, "error": str(error)}
    ids = held_out_ids(args.model)
    first = jnp.asarray([ids[:WINDOW]])
    logits = np.asarray(nnx.jit(lambda m, x: m(x))(model, first), np.float32)[0]
    windows = -(-len(ids) // WINDOW)
    result = {
        "variant": args.worker,
        "weights_gb": weight_bytes(model) / 1e9,
        "perplexity": llama_jax.train.perplexity(model, ids, window=WINDOW, batch_size=windows),
        "batches": {},
    }
    reference = os.path.join(args.scratch, "float32_logits.npy")
    if args.worker == "float32":
        np.save(reference, logits)
    else:
        float_logits = np.load(reference)
        diff = np.abs(logits - float_logits)
        result.update(
            max_diff=float(diff.max()),
            mean_diff=float(diff.mean()),
            argmax=float((logits.argmax(-1) == float_logits.argmax(-1)).mean()),
        )

    def generate(prompt, n):
        return llama_jax.generate(model, prompt, max_new_tokens=n, eos_token_id=[])

    for batch in args.batch_sizes:
        prompt = make_prompts(args.model, model.config, batch, args.prompt_tokens)
        result["batches"][str(batch)] = measure(generate, prompt, args.new_tokens, args.repeats)
        tok_s = result["batches"][str(batch)]["decode_tok_s"]
        print(f"  {args.worker} batch {batch}: {tok_s:.1f} tokens/s", file=sys.stderr, flush=True)
    result["peak_rss_gb"] = peak_rss_gb()
    return result


def transformers_worker(args) -> dict:
    import torch
    import transformers

    torch.set_num_threads(os.cpu_count())
    model = transformers.LlamaForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    ids = held_out_ids(args.model)
    total = count = 0.0
    with torch.no_grad():
        for start in range(0, len(ids), WINDOW):
            window = torch.tensor([ids[start : start + WINDOW]])
            if window.shape[1] < 2:
                continue
            total += model(window, labels=window).loss.item() * (window.shape[1] - 1)
            count += window.shape[1] - 1
    text = has_tokenizer(args.model)
    return {
        "variant": "transformers float32",
        "perplexity": math.exp(total / count),
        "tokens": len(ids),
        "text": text,
    }


def llama_cpp_worker(args) -> dict:
    import llama_cpp

    kind = args.worker.removeprefix("llama.cpp ")
    path = args.gguf
    if kind != LLAMA_CPP_TYPES[0]:  # rewritten by llama.cpp's own quantizer, from the file's weights
        path = os.path.join(args.scratch, f"model-{kind}.gguf")
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = {"Q8_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0, "F32": llama_cpp.LLAMA_FTYPE_ALL_F32}[kind]
        params.allow_requantize = True
        params.nthread = os.cpu_count()
        if llama_cpp.llama_model_quantize(args.gguf.encode(), path.encode(), params) != 0:
            raise RuntimeError(f"llama_model_quantize could not write {kind}")
    model = llama_cpp.Llama(
        path, n_ctx=512, n_batch=512, n_threads=os.cpu_count(), logits_all=False, verbose=False
    )
    prompt = make_prompts(args.model, None, 1, args.prompt_tokens)[0].tolist()

    def generate(_, n):
        model.reset()
        model.eval(prompt)
        tokens = []
        for _ in range(n):
            token = model.sample(top_k=1, temp=0.0)
            tokens.append(token)
            if len(tokens) < n:
                model.eval([token])
        return np.array([tokens])

    result = {"variant": args.worker, "weights_gb": os.path.getsize(path) / 1e9, "batches": {}}
    result["batches"]["1"] = measure(generate, np.array([prompt]), args.new_tokens, args.repeats)
    result["peak_rss_gb"] = peak_rss_gb()
    return result


def worker(args) -> None:
    if args.worker == "transformers":
        result = transformers_worker(args)
    elif args.worker.startswith("llama.cpp"):
        result = llama_cpp_worker(args)
    else:
        result = llama_jax_worker(args)
    print("RESULT " + json.dumps(result), flush=True)


def run_worker(name: str, args) -> dict | None:
    command = [sys.executable, os.path.abspath(__file__), "--worker", name, "--model", args.model]
    command += ["--scratch", args.scratch, "--new-tokens", str(args.new_tokens)]
    command += ["--prompt-tokens", str(args.prompt_tokens), "--repeats", str(args.repeats)]
    command += ["--batch-sizes", ",".join(map(str, args.batch_sizes)), "--dtype", args.dtype]
    command += ["--gguf", args.gguf] if args.gguf else []
    print(f"{name}: running", file=sys.stderr, flush=True)
    done = subprocess.run(command, capture_output=True, text=True)
    sys.stderr.write(done.stderr)
    result = result_of(done.stdout)
    if done.returncode != 0 or result is None:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        print(f"{name}: FAILED (exit {done.returncode}); skipped", file=sys.stderr)
        return {"variant": name, "error": f"failed (exit {done.returncode}): {last}"}
    return result


# ------------------------------------------------------------------------------------ the report


def report(args, machine: dict, results: list[dict], reference: dict | None, notes: list[str]) -> str:
    versions = ", ".join(f"{k} {v}" for k, v in machine["versions"].items() if v != "not installed")
    float_row = next((r for r in results if r["variant"] == "float32" and "error" not in r), None)
    float_tokens = None if float_row is None else float_row["batches"].get("1", {}).get("first_row")
    speed_row = next((r for r in results if r["variant"] == args.dtype and "error" not in r), None)
    lines = [
        "# Quantized weights: quality, bytes and decode speed",
        "",
        f"{machine['date']}, {machine['cpu']}, {machine['cores']} cores, {machine['ram_gib']} GiB; "
        f"Python {machine['python']}, {versions}.",
        "",
        f"Model `{os.path.basename(os.path.normpath(args.model))}`"
        + (f", GGUF `{os.path.basename(args.gguf)}`" if args.gguf else "")
        + ". Perplexity: "
        + (
            "random token ids (no tokenizer in the checkpoint),"
            if reference and not reference["text"]
            else "`llama_jax.data.held_out_text()`,"
        )
        + f" {reference['tokens'] if reference else '?'} tokens in windows of {WINDOW}. Logit columns: the first {WINDOW} tokens against llama_jax "
        f"float32. Decode: a {args.prompt_tokens}-token prompt, {args.new_tokens} new tokens, EOS off, "
        f"best of {args.repeats}; quantized variants compute in {args.dtype}, and their speed is compared "
        f"with {args.dtype}'s. One run: compare ratios, not figures from different runs.",
        "",
        "| variant | weights (GB) | perplexity | max / mean abs logit diff | same argmax | greedy = float32 "
        + "".join(
            f"| batch {b} TTFT (ms) | batch {b} decode tok/s | vs {args.dtype} " for b in args.batch_sizes
        )
        + "| peak RSS (GB) |",
        "|---|---|---|---|---|---" + "|---|---|---" * len(args.batch_sizes) + "|---|",
    ]
    if reference:
        blank = "| " * (3 * len(args.batch_sizes) + 1)
        lines.append(f"| transformers float32 (reference) | | {reference['perplexity']:.3f} | | | {blank}|")
    for row in results:
        if "error" in row:
            notes.append(f"{row['variant']}: not run: {row['error'].rstrip('.')}.")
            continue
        cells = [
            row["variant"],
            f"{row['weights_gb']:.3f}",
            f"{row['perplexity']:.3f}" if "perplexity" in row else "",
        ]
        if "max_diff" in row:
            cells += [f"{row['max_diff']:.2e} / {row['mean_diff']:.2e}", f"{row['argmax']:.1%}"]
        else:
            cells += ["", ""]
        first = row["batches"].get("1", {}).get("first_row")
        if float_tokens is None or first is None or row is float_row:
            cells.append("")
        else:
            cells.append(f"{same_prefix(first, float_tokens)}/{len(first)} tokens")
        for b in args.batch_sizes:
            got = row["batches"].get(str(b))
            base = None if speed_row is None else speed_row["batches"].get(str(b))
            if got is None:
                cells += ["", "", ""]
                continue
            ratio = f"{got['decode_tok_s'] / base['decode_tok_s']:.2f}x" if base else ""
            cells += [f"{1e3 * got['ttft_s']:.0f}", f"{got['decode_tok_s']:.1f}", ratio]
        cells.append(f"{row['peak_rss_gb']:.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", *[f"- {note}" for note in notes]]
    return "\n".join(lines) + "\n"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a Hugging Face Llama checkpoint (default: the bundled model)")
    parser.add_argument(
        "--gguf", help="a GGUF file of the same model (default: the bundled one, with --model unset)"
    )
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16"],
        help="what the quantized variants compute in, and the dense row their speed is compared with "
        "(auto: float32 on a CPU, bfloat16 on a GPU)",
    )
    parser.add_argument("--batch-sizes", default="1,8", type=lambda s: [int(b) for b in s.split(",")])
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-llama-cpp", action="store_true", help="skip llama.cpp even when installed")
    parser.add_argument("--output", default=os.path.join(HERE, "QUANT_RESULTS.md"), help="'-' writes nothing")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--scratch", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker:
        return worker(args)
    import importlib.util

    import llama_jax

    if args.model is None:
        args.model = llama_jax.default_checkpoint()
        if args.gguf is None:
            from llama_jax.checkpoints import bundled_gguf_path

            args.gguf = bundled_gguf_path()
    notes = []
    names = [v for v in args.variants if VARIANTS[v][1] != "gguf" or args.gguf]
    if len(names) < len(args.variants):
        notes.append("GGUF kept quantized: not run: no GGUF file (pass --gguf FILE).")
    if args.dtype == "auto":
        import jax

        args.dtype = "float32" if jax.default_backend() == "cpu" else "bfloat16"
    if "float32" not in names or args.dtype not in names:
        raise SystemExit(
            f"--variants must include float32 and {args.dtype}: the other rows are compared with them"
        )
    names.remove("float32")
    has_llama_cpp = importlib.util.find_spec("llama_cpp") is not None
    if args.gguf and not args.no_llama_cpp:
        if has_llama_cpp:
            names += [f"llama.cpp {kind}" for kind in LLAMA_CPP_TYPES]
        else:
            notes.append("llama.cpp: not run: llama-cpp-python is not installed.")
    with tempfile.TemporaryDirectory(prefix="quant-bench-") as scratch:
        args.scratch = scratch
        reference = run_worker("transformers", args)
        results = [run_worker(name, args) for name in ["float32", *names]]
    if "error" in reference:
        notes.append(f"transformers: {reference['error']}")
        reference = None
    text = report(args, machine_description(), results, reference, notes)
    publish(text, args.output)


if __name__ == "__main__":
    sys.exit(main())

"""Float32 logit parity: llama_jax against transformers' LlamaForCausalLM on the same checkpoint.

    python bench/parity.py                   # $LLAMA_JAX_MODEL, else the bundled SmolLM2-135M-Instruct
    python bench/parity.py --model DIR       # any local Hugging Face Llama checkpoint
    python bench/parity.py --rtol 1e-5       # a tighter gate (see below)

Both models are loaded in float32: llama_jax on JAX's default device (the GPU when there is one),
transformers with the eager attention (the reference definition) on the GPU when torch sees one, else
on the CPU, with TF32 turned off in torch. Three cases, with token ids drawn from the vocabulary with a
fixed seed (the tokenizer plays no part):

* short: 7 tokens, batch 1;
* long: 300 tokens, batch 1 (hundreds of positions, where RoPE and its llama3 scaling show);
* padded: a left-padded batch of two prompts (300 and 123 tokens); only real tokens are compared, and
  transformers gets the same positions as llama_jax (each row counts from its first real token).

llama_jax runs each case twice: with ``jax_default_matmul_precision`` set to ``"highest"`` (true
float32 matmuls) and to ``"default"``, which on NVIDIA A100/H100-class GPUs means TF32 (10-bit
mantissa inputs) and shows how far that moves the logits; on a CPU both give the same numbers. For
each run the table gives max |Δ logits|, that maximum relative to the largest |logit| of the
reference, and how often both pick the same argmax token. A random-weight checkpoint has nearly flat
logits, so near-ties can make argmax agreement fall below 100% without any error.

The exit status is 1 when a "highest" case has max |Δ| > atol + rtol * max |reference logit| (like
``numpy.allclose``, with the scale taken over the whole case; defaults 1e-4 and 1e-4), else 0. A fixed
absolute bound does not fit every model: the bundled SmolLM2's logits reach ~40 and float32 rounding
alone gives ~1e-3 on some 123-token prompts, while a random-weight model's logits are a few units at most.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

PRECISIONS = ("highest", "default")


def make_cases(vocab_size: int, short: int, long: int, padded: tuple[int, int]) -> dict:
    """case name -> (ids [B, T] int32, attention_mask [B, T] int32): random ids from [3, vocab)."""
    import llama_jax

    rng = np.random.default_rng(0)

    def ids(n):
        return rng.integers(3, vocab_size, size=n).astype(np.int32)

    cases = {}
    for name, length in ((f"short ({short})", short), (f"long ({long})", long)):
        prompt = ids(length)[None]
        cases[name] = prompt, np.ones_like(prompt)
    cases[f"padded ({padded[0]}+{padded[1]})"] = llama_jax.left_pad([ids(n) for n in padded], pad_id=0)
    return cases


def reference_logits(directory: str, cases: dict, device: str) -> dict:
    """transformers' float32 logits for every case (numpy), eager attention, TF32 off."""
    import torch
    import transformers

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    transformers.utils.logging.disable_progress_bar()
    model = transformers.LlamaForCausalLM.from_pretrained(
        directory, dtype=torch.float32, attn_implementation="eager"
    )
    model = model.to(device).eval()
    out = {}
    with torch.no_grad():
        for name, (ids, mask) in cases.items():
            positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
            logits = model(
                input_ids=torch.as_tensor(ids, device=device),
                attention_mask=torch.as_tensor(mask, device=device),
                position_ids=torch.as_tensor(positions, device=device),
            ).logits
            out[name] = logits.float().cpu().numpy()
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return out


def llama_jax_logits(model, cases: dict, precision: str) -> dict:
    """llama_jax's float32 logits for every case under one ``jax_default_matmul_precision``."""
    import jax
    import jax.numpy as jnp

    before = jax.config.jax_default_matmul_precision
    jax.config.update("jax_default_matmul_precision", precision)
    try:
        return {
            name: np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)), np.float32)
            for name, (ids, mask) in cases.items()
        }
    finally:
        jax.config.update("jax_default_matmul_precision", before)


def compare(ours: np.ndarray, reference: np.ndarray, mask: np.ndarray) -> dict:
    """Max |Δ|, max |Δ| / max |reference| and argmax agreement over the real (unpadded) tokens."""
    real = mask.astype(bool)
    a, b = ours[real], reference[real]  # [N, V]
    diff = float(np.abs(a - b).max())
    scale = float(np.abs(b).max())
    same = int((a.argmax(-1) == b.argmax(-1)).sum())
    return {
        "max_abs": diff,
        "scale": scale,
        "relative": diff / scale if scale else float("inf"),
        "same": same,
        "n": len(a),
    }


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model", help="checkpoint directory (default: $LLAMA_JAX_MODEL or the bundled model)"
    )
    parser.add_argument("--atol", type=float, default=1e-4, help="absolute part of the 'highest' gate")
    parser.add_argument("--rtol", type=float, default=1e-4, help="part relative to max |reference logit|")
    parser.add_argument("--short", type=int, default=7, help="tokens of the short prompt")
    parser.add_argument("--long", type=int, default=300, help="tokens of the long prompt")
    parser.add_argument(
        "--padded", default="300,123", help="lengths of the two prompts of the left-padded batch"
    )
    parser.add_argument(
        "--torch-device", choices=("auto", "cpu", "cuda"), default="auto", help="where transformers runs"
    )
    args = parser.parse_args(argv)
    try:
        args.padded = tuple(int(n) for n in args.padded.split(","))
    except ValueError:
        parser.error(f"--padded takes two lengths like 300,123, not {args.padded!r}")
    if len(args.padded) != 2 or min(args.short, args.long, *args.padded) < 1:
        parser.error("--short and --long need >= 1 token, --padded two lengths >= 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    import jax
    import torch

    import llama_jax

    directory = args.model or llama_jax.selected_checkpoint()
    config = llama_jax.LlamaConfig.from_hf(directory)
    torch_device = args.torch_device
    if torch_device == "auto":
        torch_device = "cuda" if torch.cuda.is_available() else "cpu"
    jax_device = jax.devices()[0]
    torch_name = torch.cuda.get_device_name() if torch_device == "cuda" else "CPU"
    print(f"checkpoint: {directory}")
    print(
        f"{config.num_hidden_layers} layers, hidden {config.hidden_size}, vocab {config.vocab_size}; "
        f"llama_jax on {jax_device.platform} ({jax_device.device_kind}), jax {jax.__version__}; "
        f"transformers on {torch_name}, torch {torch.__version__}",
        flush=True,
    )
    cases = make_cases(config.vocab_size, args.short, args.long, args.padded)

    start = time.perf_counter()
    reference = reference_logits(directory, cases, torch_device)
    print(f"transformers reference: {time.perf_counter() - start:.1f} s", flush=True)
    start = time.perf_counter()
    model = llama_jax.from_pretrained(directory, dtype=jax.numpy.float32, progress=False)
    print(f"llama_jax load: {time.perf_counter() - start:.1f} s", flush=True)
    rows = []
    for precision in PRECISIONS:
        start = time.perf_counter()
        ours = llama_jax_logits(model, cases, precision)
        print(f"llama_jax, precision {precision}: {time.perf_counter() - start:.1f} s", flush=True)
        for name, (_, mask) in cases.items():
            rows.append({"case": name, "precision": precision, **compare(ours[name], reference[name], mask)})

    titles = ("case", "jax precision", "max abs diff", "rel. to max |logit|", "argmax agree")
    cells = [
        (r["case"], r["precision"], f"{r['max_abs']:.3e}", f"{r['relative']:.2e}", f"{r['same']}/{r['n']}")
        for r in rows
    ]
    widths = [max(len(t), *(len(c[i]) for c in cells)) for i, t in enumerate(titles)]
    print("\n| " + " | ".join(t.ljust(w) for t, w in zip(titles, widths, strict=True)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    failed = [
        r
        for r in rows
        if r["precision"] == "highest" and not r["max_abs"] <= args.atol + args.rtol * r["scale"]
    ]
    for row, cell in zip(rows, cells, strict=True):
        mark = "  <-- over atol + rtol * max |logit|" if row in failed else ""
        print("| " + " | ".join(c.ljust(w) for c, w in zip(cell, widths, strict=True)) + " |" + mark)
    print()
    if failed:
        print(
            f"PARITY FAILED: {len(failed)} 'highest' case(s) over atol {args.atol:g} + rtol {args.rtol:g} * max |logit|"
        )
        return 1
    print(f"PARITY OK: every 'highest' case within atol {args.atol:g} + rtol {args.rtol:g} * max |logit|")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # torch shares the GPU
    sys.exit(main())

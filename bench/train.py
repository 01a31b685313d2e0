"""LoRA training benchmark: llama_jax's train step against transformers + peft on the same machine.

    python bench/train.py                  # the bundled SmolLM2-135M-Instruct, float32 on CPU
    python bench/train.py --model DIR      # any local Hugging Face Llama checkpoint

Both train the same LoRA adapter (rank, alpha, all seven projections) with AdamW on the same batches
(token ids cut from a fixed pseudo-random stream, loss on the second half of each row, as for an
answer after a prompt), in float32. Each runs in its own process (this script with ``--worker``), so
the peak resident memory is its own. Reported: the first step apart (for llama_jax it includes
compilation), then training tokens per second over the remaining steps (batch x sequence length /
mean step time), and peak RSS. The table is printed and written to bench/TRAIN_RESULTS.md; compare
ratios from one run only.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from generate import peak_rss_gb  # noqa: E402  (the same memory measure as the generation benchmark)

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def batches(vocab: int, batch: int, length: int, steps: int):
    rng = np.random.default_rng(0)
    for _ in range(steps):
        ids = rng.integers(3, min(vocab, 20000), (batch, length)).astype(np.int32)
        loss_mask = np.zeros_like(ids)
        loss_mask[:, length // 2 :] = 1
        yield ids, np.ones_like(ids), loss_mask


def run_llama_jax(args, config):
    import jax.numpy as jnp

    import llama_jax

    model = llama_jax.from_pretrained(args.model, dtype=jnp.float32, progress=False)
    llama_jax.add_lora(model, rank=args.rank, alpha=2 * args.rank)
    optimizer = llama_jax.train.lora_optimizer(model, 1e-4, clip_norm=None)
    return lambda ids, mask, loss_mask: llama_jax.train.train_step(model, optimizer, ids, mask, loss_mask)


def run_peft(args, config):
    import peft
    import torch
    import transformers

    model = transformers.LlamaForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    model = peft.get_peft_model(
        model,
        peft.LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=TARGETS, lora_dropout=0.0),
    ).train()
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.0
    )

    def step(ids, mask, loss_mask):
        labels = np.where(loss_mask == 1, ids, -100)
        loss = model(
            input_ids=torch.as_tensor(ids, dtype=torch.long),
            attention_mask=torch.as_tensor(mask),
            labels=torch.as_tensor(labels, dtype=torch.long),
        ).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        return loss.item()

    return step


def worker(args) -> None:
    import llama_jax

    config = llama_jax.LlamaConfig.from_hf(args.model)
    step = {"llama_jax": run_llama_jax, "peft": run_peft}[args.worker](args, config)
    times, losses = [], []
    for ids, mask, loss_mask in batches(config.vocab_size, args.batch, args.length, args.steps):
        start = time.perf_counter()
        losses.append(float(step(ids, mask, loss_mask)))
        times.append(time.perf_counter() - start)
    warm = float(np.mean(times[1:]))
    print(
        "RESULT "
        + json.dumps(
            {
                "framework": args.worker,
                "first_step_s": times[0],
                "step_s": warm,
                "tokens_per_s": args.batch * args.length / warm,
                "peak_rss_gb": peak_rss_gb(),
                "losses": losses,
            }
        ),
        flush=True,
    )


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="checkpoint directory (default: the bundled SmolLM2-135M-Instruct)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=128, help="tokens per row")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--steps", type=int, default=6, help="the first one is reported apart")
    parser.add_argument("--output", default=os.path.join(HERE, "TRAIN_RESULTS.md"), help="'-' writes nothing")
    parser.add_argument("--worker", choices=["llama_jax", "peft"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.steps < 2:
        parser.error("--steps must be at least 2 (the first one includes compilation)")
    if args.model is None:
        import llama_jax

        args.model = llama_jax.default_checkpoint()
    if args.worker:
        return worker(args)

    results = []
    for framework in ("llama_jax", "peft"):
        print(f"{framework}: running", file=sys.stderr, flush=True)
        command = [
            sys.executable,
            os.path.abspath(__file__),
            "--worker",
            framework,
            "--model",
            args.model,
            "--batch",
            str(args.batch),
            "--length",
            str(args.length),
            "--rank",
            str(args.rank),
            "--steps",
            str(args.steps),
        ]
        done = subprocess.run(command, stdout=subprocess.PIPE, text=True)
        lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
        if done.returncode != 0 or not lines:
            raise SystemExit(f"{framework} failed (exit {done.returncode})")
        results.append(json.loads(lines[-1][len("RESULT ") :]))

    reference = results[1]["tokens_per_s"]
    rows = [
        "| framework | first step (s) | step (s) | training tokens/s | vs transformers + peft | peak RSS (GB) |",
        "|---|---|---|---|---|---|",
    ]
    labels = {"llama_jax": "llama_jax `train.train_step` (nnx.jit)", "peft": "transformers + peft (PyTorch)"}
    for r in results:
        rows.append(
            f"| {labels[r['framework']]} | {r['first_step_s']:.1f} | {r['step_s']:.2f} | "
            f"{r['tokens_per_s']:.0f} | {r['tokens_per_s'] / reference:.2f}x | {r['peak_rss_gb']:.2f} |"
        )
    versions = ", ".join(
        f"{p} {importlib.metadata.version(p)}"
        for p in ("jax", "flax", "optax", "torch", "transformers", "peft")
    )
    report = "\n".join(
        [
            "# LoRA training benchmark",
            "",
            f"{datetime.date.today()}, {platform.machine()} with {os.cpu_count()} CPUs, {versions}.",
            "",
            f"Model `{os.path.basename(os.path.normpath(args.model))}`, float32; batch {args.batch} x {args.length} tokens "
            f"(loss on the second half of each row); LoRA rank {args.rank}, alpha {2 * args.rank}, on "
            f"{', '.join(TARGETS)}; AdamW, learning rate 1e-4; {args.steps} steps, the first reported apart "
            "(llama_jax compiles then). One run: compare the ratios, not figures from different runs.",
            "",
            *rows,
            "",
            "First-step losses (B starts at zero, so both are the base model's loss on the same batch): "
            + ", ".join(f"{r['framework']} {r['losses'][0]:.3f}" for r in results),
            "",
        ]
    )
    print(report)
    if args.output != "-":
        with open(args.output, "w") as f:
            f.write(report)


if __name__ == "__main__":
    main()

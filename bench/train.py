"""LoRA training benchmark: llama_jax's train step against transformers + peft on the same machine.

    python bench/train.py                         # the bundled SmolLM2-135M-Instruct, float32 on CPU
    python bench/train.py --model DIR             # any local Hugging Face Llama checkpoint
    python bench/train.py --random-llama-3.2-1b   # random weights in Llama 3.2 1B's shape (for a GPU)

Both train the same LoRA adapter (rank, alpha, all seven projections) with AdamW on the same batches
(token ids cut from a fixed pseudo-random stream, loss on the second half of each row, as for an
answer after a prompt). The frozen base is held in ``--dtype`` (float32, or bfloat16), the adapters and
the loss in float32, in both. Where a GPU is visible (``nvidia-smi``) both run on it, and the defaults
become the GPU run of bench/GPU_RESULTS.md: bfloat16, batch 8 x 512. Each runs in its own process (this
script with ``--worker``), so the peak resident and device memory are its own. Reported: the first step
apart (for llama_jax it includes compilation), then training tokens per second over the remaining
steps (batch x sequence length / mean step time), peak RSS and peak device memory, and under the
table each llama_jax process's first step split into tracing, lowering, XLA's compilation (or loading
it from the cache) and the rest. ``--rounds N`` runs every worker N times, in turn, and reports each
one's fastest run. The table is printed and written to bench/TRAIN_RESULTS.md; compare ratios from
one run only.

Every worker runs in the environment ``llama-jax finetune`` gives itself (glibc's large allocations in
transparent huge pages, where glibc and the kernel allow: ``llama_jax.cli.training_environment``);
where that differs from this process's own environment, llama_jax (from the compilation cache) and
transformers + peft also run in the latter (on the CPU only), and peft's faster run is the reference.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
# the same memory measures and random 1B checkpoint as the generation benchmark
from generate import (  # noqa: E402
    device_peak_gb,
    machine_description,
    peak_rss_gb,
    result_of,
    write_random_llama_1b,
)

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# jax.monitoring's duration events that split llama_jax's first step (summed over every program compiled
# in it); backend_compile includes loading the compiled program when the compilation cache has it
FIRST_STEP_PARTS = {
    "/jax/core/compile/jaxpr_trace_duration": "tracing",
    "/jax/core/compile/jaxpr_to_mlir_module_duration": "lowering",
    "/jax/core/compile/backend_compile_duration": "XLA compilation",
    "/jax/compilation_cache/cache_retrieval_time_sec": "of which loading from the cache",
}


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

    model = llama_jax.from_pretrained(args.model, dtype=jnp.dtype(args.dtype), progress=False)
    llama_jax.add_lora(model, rank=args.rank, alpha=2 * args.rank)
    model.model.gradient_checkpointing = args.worker == "llama_jax_remat"
    optimizer = llama_jax.train.lora_optimizer(model, 1e-4, clip_norm=None)

    def step(ids, mask, loss_mask):
        return llama_jax.train.train_step(model, optimizer, ids, mask, loss_mask)

    def temp_gb():  # what the compiled step allocates beyond its inputs: mostly activations for the backward pass
        batch = next(batches(config.vocab_size, args.batch, args.length, 1))
        return (
            llama_jax.train.lower_train_step(model, optimizer, *batch)
            .compile()
            .memory_analysis()
            .temp_size_in_bytes
            / 1e9
        )

    step.temp_gb = temp_gb  # asked after the timed steps, so that its compilation is not counted in them
    return step


def run_peft(args, config):
    import peft
    import torch
    import transformers

    device = "cuda" if args.gpu else "cpu"
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    model = transformers.LlamaForCausalLM.from_pretrained(args.model, dtype=dtype).to(device)
    model = peft.get_peft_model(  # peft keeps the adapters in float32 over a bfloat16 base (autocast_adapter_dtype)
        model,
        peft.LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=TARGETS, lora_dropout=0.0),
    ).train()
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.0
    )

    def step(ids, mask, loss_mask):
        labels = np.where(loss_mask == 1, ids, -100)
        loss = model(
            input_ids=torch.as_tensor(ids, dtype=torch.long, device=device),
            attention_mask=torch.as_tensor(mask, device=device),
            labels=torch.as_tensor(labels, dtype=torch.long, device=device),
        ).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        return loss.item()

    return step


def worker(args) -> None:
    import llama_jax

    if args.cache:  # JAX's persistent compilation cache, as the CLI keeps it
        llama_jax.enable_compilation_cache(args.cache)
    config = llama_jax.LlamaConfig.from_hf(args.model)
    runner = run_peft if args.worker == "peft" else run_llama_jax  # every llama_jax_* worker: the same run
    step = runner(args, config)
    times, losses = [], []
    parts = {}  # llama_jax: FIRST_STEP_PARTS' seconds during the first step
    if runner is run_llama_jax:
        import jax

        def record(event, seconds, **kwargs):
            if event in FIRST_STEP_PARTS and not times:  # before the first step has ended
                parts[event] = parts.get(event, 0.0) + seconds

        jax.monitoring.register_event_duration_secs_listener(record)
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
                "peak_device_gb": device_peak_gb("transformers" if args.worker == "peft" else "llama_jax")
                if args.gpu
                else None,
                "losses": losses,
                "temp_gb": step.temp_gb() if hasattr(step, "temp_gb") else None,
                "first_step_parts": parts,
            }
        ),
        flush=True,
    )


def first_step_line(label: str, result: dict) -> str:
    """- LABEL: first step 19.1 s = tracing 2.3 s + lowering 0.5 s + XLA compilation 9.5 s + the rest 6.8 s"""
    seconds_of = result["first_step_parts"]
    parts = {name: seconds_of[event] for event, name in FIRST_STEP_PARTS.items() if event in seconds_of}
    loaded = parts.pop("of which loading from the cache", None)
    rest = result["first_step_s"] - sum(parts.values())
    terms = [f"{name} {seconds:.1f} s" for name, seconds in parts.items()]
    if loaded is not None:
        terms[-1] += f" (of which loading it from the cache {loaded:.1f} s)"
    return f"- {label}: first step {result['first_step_s']:.1f} s = " + " + ".join(
        [*terms, f"the rest {rest:.1f} s"]
    )


def gpu_visible() -> bool:
    """An NVIDIA GPU is there (asked of nvidia-smi, so that this process initializes no framework)."""
    if shutil.which("nvidia-smi") is None:
        return False
    return subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True).stdout.startswith("GPU")


def gpu_name() -> str:
    out = subprocess.run(
        ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True
    )
    return out.stdout.strip().splitlines()[0] if out.stdout.strip() else "?"


def run_workers(args, runs) -> list[dict]:
    """One run of every (worker, environment) in ``runs``, each in its own process; their RESULT lines.

    llama_jax's workers share one new compilation cache: the first process compiles the step and stores
    it, the second (a rerun, a resumed job) loads it, which is its first step's cost without compiling."""
    results = []
    cache = tempfile.mkdtemp(prefix="llama-jax-bench-cache-")
    for framework, env in runs:
        print(
            f"{framework}: running (GLIBC_TUNABLES={env.get('GLIBC_TUNABLES')})", file=sys.stderr, flush=True
        )
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
            "--dtype",
            args.dtype,
            *(["--gpu"] if args.gpu else []),
            *(["--remat"] if args.remat else []),
            *(["--cache", cache] if framework.startswith("llama_jax") else []),
        ]
        done = subprocess.run(command, stdout=subprocess.PIPE, text=True, env=env)
        result = result_of(done.stdout)
        if done.returncode != 0 or result is None:
            raise SystemExit(f"{framework} failed (exit {done.returncode})")
        results.append({**result, "tunables": env.get("GLIBC_TUNABLES")})

    shutil.rmtree(cache, ignore_errors=True)
    return results


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="checkpoint directory (default: the bundled SmolLM2-135M-Instruct)")
    parser.add_argument(
        "--random-llama-3.2-1b",
        dest="random_llama_1b",
        action="store_true",
        help="random weights in Llama 3.2 1B's shape",
    )
    parser.add_argument(
        "--dtype",
        choices=["float32", "bfloat16"],
        help="the frozen base's (default: bfloat16 on a GPU, else float32)",
    )
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, help="tokens per row (default: 512 on a GPU, else 128)")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10, help="the first one is reported apart")
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="run every worker this many times, in turn, and keep each one's fastest run (a shared "
        "machine's speed drifts from minute to minute)",
    )
    parser.add_argument("--output", default=os.path.join(HERE, "TRAIN_RESULTS.md"), help="'-' writes nothing")
    parser.add_argument(
        "--remat",
        action="store_true",
        help="also llama_jax with gradient checkpointing (each layer recomputed in the backward pass)",
    )
    parser.add_argument(
        "--worker",
        choices=["llama_jax", "llama_jax_cached", "llama_jax_remat", "peft"],
        help=argparse.SUPPRESS,
    )
    parser.add_argument("--cache", help=argparse.SUPPRESS)  # for the workers: a compilation cache directory
    parser.add_argument("--gpu", action="store_true", help=argparse.SUPPRESS)  # set for the workers
    args = parser.parse_args(argv)
    if args.steps < 2:
        parser.error("--steps must be at least 2 (the first one includes compilation)")
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    if args.worker:
        return worker(args)
    args.gpu = gpu_visible()
    args.dtype = args.dtype or ("bfloat16" if args.gpu else "float32")
    args.length = args.length or (512 if args.gpu else 128)
    if args.random_llama_1b:
        args.model = write_random_llama_1b(tempfile.mkdtemp(prefix="llama-3.2-1b-random-"))
    elif args.model is None:
        import llama_jax

        args.model = llama_jax.default_checkpoint()

    from llama_jax.cli import training_environment

    huge_pages = training_environment()
    environment = huge_pages or dict(os.environ)
    tunables = environment.get("GLIBC_TUNABLES") or "(none)"
    runs = [  # (worker, its environment): the finetune command's, then both again in this one if it differs
        *((w, environment) for w in ("llama_jax", "llama_jax_cached", *(["llama_jax_remat"] * args.remat))),
        ("peft", environment),
        # what train_step gives in a process started without the setting (a notebook, your own script);
        # on the CPU only, where the setting matters (and a GPU's time is short)
        *(
            [("llama_jax_cached", dict(os.environ)), ("peft", dict(os.environ))]
            if huge_pages and not args.gpu
            else []
        ),
    ]
    rounds = []
    for _ in range(args.rounds):
        rounds.append(run_workers(args, runs))
    # each worker's fastest run (its step time; the whole row comes from that run)
    results = [min(same, key=lambda r: r["step_s"]) for same in zip(*rounds, strict=True)]
    reference = max(r["tokens_per_s"] for r in results if r["framework"] == "peft")
    model_name = os.path.basename(os.path.normpath(args.model))
    if args.random_llama_1b:
        model_name = "random weights in Llama 3.2 1B's shape"
        shutil.rmtree(args.model, ignore_errors=True)
    rows = [
        "| framework | first step (s) | step (s) | training tokens/s | vs transformers + peft | peak RSS (GB) "
        "| peak device memory (GB) | compiled step's temporaries (GB) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    labels = {
        "llama_jax": "llama_jax `train.train_step` (one jitted program)",
        "llama_jax_cached": "llama_jax again, in a new process: the step from the compilation cache",
        "llama_jax_remat": "llama_jax, gradient checkpointing (`--remat`)",
        "peft": "transformers + peft (PyTorch)",
    }

    def tag(r) -> str:  # a run outside the common environment says so
        same = r["tunables"] == environment.get("GLIBC_TUNABLES")
        return "" if same else f", GLIBC_TUNABLES={r['tunables'] or '(none)'}"

    for r in results:
        rows.append(
            f"| {labels[r['framework']]}{tag(r)} | {r['first_step_s']:.1f} | {r['step_s']:.2f} | "
            f"{r['tokens_per_s']:.0f} | {r['tokens_per_s'] / reference:.2f}x | {r['peak_rss_gb']:.2f} | "
            + ("-" if r["peak_device_gb"] is None else f"{r['peak_device_gb']:.2f}")
            + " | "
            + ("-" if r["temp_gb"] is None else f"{r['temp_gb']:.2f}")
            + " |"
        )
    environment_note = ""
    if huge_pages:
        environment_note = (
            " (what `llama-jax finetune` sets for itself: glibc's large allocations, such as the compiled "
            "step's temporaries, in transparent huge pages)"
        )
    if any(r["tunables"] != environment.get("GLIBC_TUNABLES") for r in results):
        environment_note += (
            "; the last two rows ran without it, as a process started without the setting does (a notebook, "
            "your own script), and the faster of transformers + peft's two runs is the reference"
        )
    versions = ", ".join(
        f"{p} {importlib.metadata.version(p)}"
        for p in ("jax", "flax", "optax", "torch", "transformers", "peft")
    )
    report = "\n".join(
        [
            "# LoRA training benchmark",
            "",
            f"{datetime.date.today()}, {machine_description()['cpu']} ({platform.machine()}) with "
            f"{os.cpu_count()} CPUs" + (f", GPU {gpu_name()}" if args.gpu else "") + f", {versions}.",
            "",
            f"Model `{model_name}`, frozen base in {args.dtype}, adapters and loss in float32, on the "
            f"{'GPU' if args.gpu else 'CPU'}; batch {args.batch} x {args.length} tokens "
            f"(loss on the second half of each row); LoRA rank {args.rank}, alpha {2 * args.rank}, on "
            f"{', '.join(TARGETS)}; AdamW, learning rate 1e-4; {args.steps} steps, the first reported apart "
            "(llama_jax compiles then, except in its second process, which finds the step in the JAX "
            "compilation cache that the first one filled, as a rerun of the CLI does). "
            + (
                "One run"
                if args.rounds == 1
                else f"{args.rounds} rounds of every worker in turn, each worker's fastest run kept"
            )
            + ": compare the ratios, not figures from different runs. Environment: "
            f"GLIBC_TUNABLES={tunables}{environment_note}.",
            "",
            *rows,
            "",
            "First-step losses (B starts at zero, so each is the base model's loss on the same batch): "
            + ", ".join(f"{r['framework']}{tag(r)} {r['losses'][0]:.3f}" for r in results),
            "",
            "Where llama_jax's first step went (JAX's compile events, `jax.monitoring`; the rest is the "
            "step's first run, with its first allocations, and Python):",
            "",
            *(first_step_line(labels[r["framework"]] + tag(r), r) for r in results if r["first_step_parts"]),
            "",
        ]
    )
    print(report)
    if args.output != "-":
        with open(args.output, "w") as f:
            f.write(report)


if __name__ == "__main__":
    main()

"""A whole ``llama-jax finetune`` run from the command line, timed from outside: the bundled model learns
chapter 11's task (a sentence in, the person in it as JSON out) from a dataset this script writes in
mlx-lm's ``messages`` format, then answers held-out sentences with ``--adapter``.

    python bench/finetune.py                          # 200 steps, batch 4, the bundled model
    python bench/finetune.py --model DIR --steps 50   # any checkpoint with a chat template

Reports the command's wall time (load, tokenize, compile, train, save), the training tokens/s and
first step the command prints, the held-out loss before and after, and the exact-match rate of greedy
answers on the held-out sentences before and after; writes ``bench/FINETUNE_RESULTS.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
NAMES = "Maria John Aisha Kenji Olga Pedro Fatima Liam Chen Sofia Omar Ingrid Raj Elena Tomas Amara".split()
HELD_OUT_NAMES = "Yuki Lucas Zara Mateo Nadia Felix".split()
CITIES = "Lisbon Paris Nairobi Osaka Warsaw Lima Cairo Dublin Shanghai Madrid Toronto Oslo Mumbai".split()
PHRASINGS = [
    "{name}, {age}, moved to {city} last spring.",
    "{name} is {age} years old and lives in {city}.",
    "At {age}, {name} opened a small bakery in {city}.",
    "{age}-year-old {name} grew up in {city}.",
    "Our new colleague {name} ({age}) joins the {city} office.",
    "Born in {city}, {name} is now {age}.",
]
INSTRUCTION = 'Extract the person as JSON with the keys "name", "age" and "city".'
SYSTEM = "Reply with JSON only."


def example(rng, names) -> tuple[str, str]:
    person = {
        "name": str(rng.choice(names)),
        "age": int(rng.integers(18, 90)),
        "city": str(rng.choice(CITIES)),
    }
    return str(rng.choice(PHRASINGS)).format(**person), json.dumps(person)


def messages(sentence: str, answer: str | None = None) -> list[dict]:
    chat = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": f"{INSTRUCTION}\n{sentence}"}]
    return chat + ([{"role": "assistant", "content": answer}] if answer is not None else [])


def write_data(directory: str, train: int, valid: int) -> list[tuple[str, str]]:
    """train.jsonl and valid.jsonl (people the training set never sees); returns the held-out pairs."""
    rng = np.random.default_rng(0)
    sets = {"train": [example(rng, NAMES) for _ in range(train)]}
    sets["valid"] = [example(rng, HELD_OUT_NAMES) for _ in range(valid)]
    for name, rows in sets.items():
        with open(os.path.join(directory, f"{name}.jsonl"), "w") as f:
            f.writelines(json.dumps({"messages": messages(s, a)}) + "\n" for s, a in rows)
    return sets["valid"]


def exact_match(model_dir: str | None, adapter: str | None, held_out) -> float:
    """The share of held-out sentences whose greedy answer is exactly the expected JSON."""
    import llama_jax

    directory = model_dir or llama_jax.default_checkpoint()
    model = llama_jax.from_pretrained(directory, dtype=np.float32, progress=False)
    if adapter:
        llama_jax.load_adapter(model, adapter)
    tokenizer = llama_jax.load_tokenizer(directory)
    answers = llama_jax.generate_text(
        model, tokenizer, [messages(s) for s, _ in held_out], chat=True, max_new_tokens=32
    )
    return float(np.mean([a.strip() == expected for a, (_, expected) in zip(answers, held_out, strict=True)]))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", help="checkpoint directory (default: the bundled model)")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--train-rows", type=int, default=800)
    parser.add_argument("--valid-rows", type=int, default=32)
    parser.add_argument("--extra", default="", help="more finetune options, e.g. '--remat --dtype bfloat16'")
    parser.add_argument("--output", default=os.path.join(HERE, "FINETUNE_RESULTS.md"), help="'-': print only")
    args = parser.parse_args()

    work = tempfile.mkdtemp(prefix="llama-jax-finetune-")
    data, run = os.path.join(work, "data"), os.path.join(work, "run")
    os.makedirs(data)
    held_out = write_data(data, args.train_rows, args.valid_rows)
    command = [sys.executable, "-m", "llama_jax", "finetune", "--data", data, "--output", run]
    command += ["--steps", str(args.steps), "--batch", str(args.batch), "--lr", str(args.lr)]
    command += ["--rank", str(args.rank), "--schedule", "cosine", "--warmup", str(max(1, args.steps // 20))]
    command += ["--save-every", str(max(1, args.steps // 4)), *args.extra.split()]
    command += ["--model", args.model] if args.model else []
    print("$", " ".join(command[1:]), flush=True)
    began = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    wall = time.perf_counter() - began
    sys.stderr.write(done.stderr[-3000:])
    if done.returncode:
        raise SystemExit(f"finetune failed with status {done.returncode}")
    print(done.stdout, flush=True)
    trained = re.search(r"in ([\d.]+) s \(([\d,]+) tokens/s; first step ([\d.]+) s\)", done.stdout)
    losses = re.search(r"held-out loss ([\d.]+) \(step 0\) -> ([\d.]+) \(step (\d+)\)", done.stdout)
    before, after = exact_match(args.model, None, held_out), exact_match(args.model, run, held_out)
    rows = [
        ("command wall time (load, tokenize, compile, train, save)", f"{wall:.0f} s"),
        ("training steps' time (first step included)", f"{float(trained[1]):.0f} s"),
        ("first step (compilation)", f"{float(trained[3]):.1f} s"),
        ("training tokens/s (real tokens, padding excluded)", trained[2]),
        ("held-out loss before -> after", f"{float(losses[1]):.3f} -> {float(losses[2]):.3f}"),
        (f"held-out exact match ({len(held_out)} sentences) before -> after", f"{before:.0%} -> {after:.0%}"),
    ]
    report = "\n".join(
        [
            "# `llama-jax finetune`: one run from the command line",
            "",
            f"`{' '.join(['llama-jax', *command[3:]])}`".replace(work, "$WORK"),
            "",
            f"{args.train_rows} training rows, {args.valid_rows} held out (people the training set never sees), "
            f"chapter 11's task in mlx-lm's `messages` format; {platform.machine()}, {os.cpu_count()} cores, "
            f"Python {platform.python_version()}.",
            "",
            "| what | figure |",
            "|---|---|",
            *[f"| {what} | {figure} |" for what, figure in rows],
            "",
        ]
    )
    print(report)
    if args.output != "-":
        with open(args.output, "w") as f:
            f.write(report)


if __name__ == "__main__":
    main()

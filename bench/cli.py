"""Command-line wall time: ``python -m llama_jax generate`` against a 7-line transformers script.

    python bench/cli.py                 # the bundled SmolLM2-135M-Instruct, float32 on CPU
    python bench/cli.py --runs 5        # more warm runs (the best is reported)

Both do the same job in a fresh process: load the bundled checkpoint and its tokenizer, then greedily
continue "The capital of France is" by 24 tokens and print the text. Measured from outside, as a user
waits for it (interpreter start and imports included):

* llama_jax cold: an empty compilation cache (a fresh ``$LLAMA_JAX_CACHE/xla``), so it compiles;
* llama_jax warm: the same cache again, so the programs come from JAX's persistent cache;
* llama_jax without the cache (``LLAMA_JAX_NO_COMPILATION_CACHE=1``): what every call cost before;
* the transformers script (``TRANSFORMERS_SCRIPT`` below).

A last run prints where the time of one warm llama_jax process goes (import, from_pretrained,
load_tokenizer, first and second generate_text). Results are printed and written to
bench/CLI_RESULTS.md. Ratios are only meaningful within one run on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from generate import publish  # noqa: E402

PROMPT = "The capital of France is"
NEW_TOKENS = 24

TRANSFORMERS_SCRIPT = f"""import sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
tokenizer = AutoTokenizer.from_pretrained(sys.argv[1])
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32)
inputs = tokenizer({PROMPT!r}, return_tensors="pt")
out = model.generate(**inputs, max_new_tokens={NEW_TOKENS}, do_sample=False)
print(tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
"""

BREAKDOWN_SCRIPT = f"""import json, sys, time
start = time.perf_counter()
import jax.numpy as jnp
import llama_jax
times = {{"import": time.perf_counter() - start}}
llama_jax.enable_compilation_cache()
directory = llama_jax.default_checkpoint()
t = time.perf_counter(); model = llama_jax.from_pretrained(directory, dtype=jnp.float32, progress=False)
times["from_pretrained"] = time.perf_counter() - t
t = time.perf_counter(); tokenizer = llama_jax.load_tokenizer(directory)
times["load_tokenizer"] = time.perf_counter() - t
for name in ("first generate_text", "second generate_text"):
    t = time.perf_counter()
    # streamed, as the CLI does: the same programs, so a warm process finds them in the cache
    llama_jax.generate_text(model, tokenizer, {PROMPT!r}, max_new_tokens={NEW_TOKENS}, stream=lambda piece: None)
    times[name] = time.perf_counter() - t
print(json.dumps(times))
"""


def wall(command: list[str], env: dict) -> tuple[float, str]:
    """Seconds from start to exit of ``command``, and what it printed."""
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=1800)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{result.stderr}")
    return seconds, result.stdout.strip()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=3, help="warm runs of each; the best is reported")
    parser.add_argument("--output", default=os.path.join(HERE, "CLI_RESULTS.md"), help="'-' to write no file")
    args = parser.parse_args(argv)

    import llama_jax

    checkpoint = llama_jax.default_checkpoint()  # built once, outside the timings
    python = sys.executable
    cli = [python, "-m", "llama_jax", "generate", PROMPT, "--max-new-tokens", str(NEW_TOKENS)]
    base = {**os.environ, "TQDM_DISABLE": "1"}
    base.pop("LLAMA_JAX_NO_COMPILATION_CACHE", None)
    rows, texts = [], {}
    with tempfile.TemporaryDirectory(prefix="llama-jax-bench-cli-") as scratch:
        # a cache root of our own whose compilation cache starts empty, holding the usual checkpoint
        os.symlink(checkpoint, os.path.join(scratch, os.path.basename(checkpoint)))
        env = {**base, "LLAMA_JAX_CACHE": scratch}
        script = os.path.join(scratch, "transformers_generate.py")
        with open(script, "w") as f:
            f.write(TRANSFORMERS_SCRIPT)

        seconds, texts["llama_jax"] = wall(cli, env)
        rows.append(("llama_jax CLI, cold (empty compilation cache)", seconds))
        print(f"cold: {seconds:.1f} s", file=sys.stderr, flush=True)
        entries = len(os.listdir(os.path.join(scratch, "xla")))
        warm = [wall(cli, env)[0] for _ in range(args.runs)]
        rows.append(("llama_jax CLI, warm (programs from JAX's persistent cache)", min(warm)))
        off = [
            wall(cli, {**env, "LLAMA_JAX_NO_COMPILATION_CACHE": "1"})[0] for _ in range(max(1, args.runs - 2))
        ]
        rows.append(("llama_jax CLI, compilation cache off", min(off)))
        theirs = []
        for _ in range(args.runs):
            seconds, texts["transformers"] = wall([python, script, checkpoint], base)
            theirs.append(seconds)
        rows.append(("transformers script (7 lines)", min(theirs)))
        breakdown = json.loads(wall([python, "-c", BREAKDOWN_SCRIPT], env)[1].splitlines()[-1])

    reference = min(theirs)
    lines = [
        "# Command-line wall time",
        "",
        f"{datetime.date.today()}, {platform.processor() or platform.machine()}, {os.cpu_count()} CPU(s), "
        f"`{os.path.basename(checkpoint)}` float32, prompt {PROMPT!r}, {NEW_TOKENS} new tokens, greedy. "
        f"Warm rows: best of {args.runs} runs. Regenerate: `make bench-cli` (or `python bench/cli.py`).",
        "",
        "| what | wall time (s) | / transformers script |",
        "|---|---:|---:|",
        *(f"| {name} | {seconds:.1f} | {seconds / reference:.2f} |" for name, seconds in rows),
        "",
        f"The cold run left {entries} programs in JAX's compilation cache. Same text from both: "
        f"{texts['llama_jax'] == texts['transformers']} ({texts['llama_jax']!r}).",
        "",
        "Where one warm llama_jax process spends its time (in-process, seconds):",
        "",
        "| step | s |",
        "|---|---:|",
        *(f"| {name} | {seconds:.2f} |" for name, seconds in breakdown.items()),
        "",
    ]
    text = "\n".join(lines)
    publish(text, args.output)


if __name__ == "__main__":
    main()

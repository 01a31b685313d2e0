"""The generation benchmark runs end to end (a few tokens on a tiny checkpoint) and writes its report.

No timing is asserted: only that every framework ran, the report has its parts, and every framework
produced transformers' greedy tokens (the "same tokens" column is computed by the benchmark itself).
"""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys

import pytest

from llama_jax.cli import training_environment

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_bench_runs_all_frameworks_on_a_tiny_checkpoint(tiny_checkpoints, tmp_path):
    # "untied" uses the default RoPE, which Keras Hub reads fully, so all four must agree token for token.
    output = tmp_path / "RESULTS.md"
    done = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "bench", "generate.py"),
            "--model",
            tiny_checkpoints["untied"],
            "--new-tokens",
            "4",
            "--naive-new-tokens",
            "4",
            "--batch-sizes",
            "1,2",
            "--prompt-tokens",
            "8",
            "--repeats",
            "1",
            "--output",
            str(output),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = output.read_text()
    print(report)
    assert "FAILED" not in done.stderr and "Not measured" not in report
    assert "Batch-1 decode roofline" in report and "Memory bandwidth" in report
    rows = [line for line in report.splitlines() if line.startswith("| ") and "framework" not in line]
    assert len(rows) == 4 * 2  # four frameworks x two batch sizes
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        # decode tokens/s is a number (its value is not asserted; on a tiny model it may be nan)
        float(cells[3])
        if not cells[0].startswith("transformers"):
            assert cells[-1] == "4/4", row


def test_train_bench_runs_on_a_tiny_checkpoint(tiny_checkpoints, tmp_path):
    output = tmp_path / "TRAIN_RESULTS.md"
    done = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "bench", "train.py"),
            "--model",
            tiny_checkpoints["untied"],
            "--batch",
            "2",
            "--length",
            "16",
            "--rank",
            "4",
            "--steps",
            "2",
            "--rounds",
            "2",
            "--output",
            str(output),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = output.read_text()
    print(report)
    rows = [line for line in report.splitlines() if line.startswith("| ") and "framework" not in line]
    labels = [row.split("|")[1].strip() for row in rows]
    # every worker runs in the environment `llama-jax finetune` gives itself; where that is not this
    # one (glibc's huge pages turned on), llama_jax and peft run again in this one, and peft's faster run
    # is 1.00x
    huge_pages = training_environment()
    assert len(rows) == (5 if huge_pages else 3), report  # one row per worker, whatever the rounds
    assert "2 rounds of every worker in turn, each worker's fastest run kept" in report
    assert done.stderr.count("llama_jax_cached: running") == (4 if huge_pages else 2)  # each run twice
    assert labels[0].startswith("llama_jax `train") and "compilation cache" in labels[1]
    assert labels[2] == "transformers + peft (PyTorch)"
    if huge_pages:
        unset = f", GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '(none)')}"
        assert labels[3] == labels[1] + unset and labels[4] == labels[2] + unset
        assert f"Environment: GLIBC_TUNABLES={huge_pages['GLIBC_TUNABLES']} (what" in report
    ratios = []
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert float(cells[3]) > 0 and cells[4].endswith("x")  # tokens/s and the ratio (values not asserted)
        ratios.append(cells[4])
    peft = [ratio for label, ratio in zip(labels, ratios, strict=True) if label.startswith("transformers")]
    assert "1.00x" in peft and all(float(r[:-1]) <= 1.0 for r in peft)  # the faster peft run is the reference
    # each llama_jax process's first step, split by JAX's compile events: the first compiles the step,
    # the second loads it from the compilation cache the first one filled
    parts = [line for line in report.splitlines() if line.startswith("- llama_jax")]
    assert len(parts) == (3 if huge_pages else 2), report
    assert parts[0].startswith(f"- {labels[0]}: first step ") and "+ XLA compilation " in parts[0]
    assert "tracing" in parts[0] and "loading it from the cache" not in parts[0]
    assert (
        parts[1].startswith(f"- {labels[1]}: first step ")
        and "(of which loading it from the cache " in parts[1]
    )


def test_parity_tool_passes_on_a_checkpoint_and_its_gate_can_fail(tiny_checkpoints):
    """bench/parity.py (run on the GPU machine) gates float32 parity with llama3 RoPE scaling and a
    left-padded batch; with a bound that no difference can meet (negative), it must say so and exit 1."""

    def parity(*extra):
        command = [sys.executable, os.path.join(ROOT, "bench", "parity.py")]
        command += ["--model", tiny_checkpoints["llama32_tied"], "--long", "40", "--padded", "40,13", *extra]
        return subprocess.run(command, capture_output=True, text=True, timeout=600)

    same = parity()
    assert same.returncode == 0, same.stdout + same.stderr
    assert "PARITY OK" in same.stdout and "| padded (40+13)" in same.stdout
    impossible = parity("--atol", "-1", "--rtol", "0")
    assert impossible.returncode == 1 and "PARITY OK" not in impossible.stdout


def test_decode_profile_counts_the_operations_of_a_generate_call(tiny_checkpoints, tmp_path):
    """bench/decode_profile.py (run on the GPU machine too) reads back its own trace: it finds the
    operations XLA ran (a decode step has at least one per layer) and writes its report, for llama_jax
    (float32, int8), keras-hub and the fixed-length decode loop (which must give generate's tokens)."""
    output = tmp_path / "profile.md"
    command = [sys.executable, os.path.join(ROOT, "bench", "decode_profile.py")]
    command += ["--model", tiny_checkpoints["untied"], "--dtype", "float32", "--new-tokens", "4"]
    done = subprocess.run(
        [*command, "--prompt-tokens", "8", "--output", str(output)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = output.read_text()
    print(report)
    per_token = next(line for line in report.splitlines() if line.startswith("| XLA operations"))
    assert float(per_token.split("|")[2]) >= 2  # the tiny checkpoint has 2 layers
    assert (
        "| top kernels by time |" in report and "| top kinds of kernel (instances summed) by time |" in report
    )
    done = subprocess.run(  # the same with int8 weights
        [*command, "--quantize", "int8", "--prompt-tokens", "8", "--output", str(output)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert ", int8 weights, batch 1" in output.read_text().splitlines()[0]
    done = subprocess.run(  # keras-hub's generate, the same way
        [*command, "--framework", "keras_hub", "--prompt-tokens", "8", "--output", str(output)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = output.read_text()
    assert report.startswith("# Decode profile: keras-hub `Llama3CausalLM.generate` (JAX), ")
    per_token = next(line for line in report.splitlines() if line.startswith("| XLA operations"))
    assert float(per_token.split("|")[2]) >= 2
    done = subprocess.run(  # the experiment: the same model in a decode loop of fixed length
        [*command, "--framework", "llama_jax_fixed", "--prompt-tokens", "8", "--output", str(output)],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "XLA_FLAGS": "--xla_cpu_enable_fast_math=false"},  # named in the title
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = output.read_text()
    print(report)
    title = report.splitlines()[0]
    assert (
        "in a decode loop of fixed length" in title and "XLA_FLAGS=--xla_cpu_enable_fast_math=false" in title
    )
    # float32 on the CPU: the fixed-length loop gives generate's 4 greedy tokens
    assert (
        "Same greedy tokens as `llama_jax.generate` (first row, before the first difference): 4/4." in report
    )


def test_quant_bench_runs_on_a_tiny_checkpoint(tiny_chat_checkpoint, tmp_path):
    """bench/quant.py: a row per variant, the reference perplexity from transformers, and a variant the
    model cannot take (groups of 128 on a hidden size of 64) reported as not run, with quantize's error."""
    output = tmp_path / "QUANT_RESULTS.md"
    command = [sys.executable, os.path.join(ROOT, "bench", "quant.py"), "--model", tiny_chat_checkpoint]
    command += ["--variants", "float32", "int8", "int4 g128", "--batch-sizes", "1", "--new-tokens", "4"]
    command += ["--prompt-tokens", "8", "--repeats", "1", "--no-llama-cpp", "--output", str(output)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    report = output.read_text()
    print(report)
    rows = {
        cells[0]: cells
        for line in report.splitlines()
        if line.startswith("| ") and "variant" not in line
        for cells in [[c.strip() for c in line.strip("|").split("|")]]
    }
    assert list(rows) == ["transformers float32 (reference)", "float32", "int8"]
    # llama_jax's float32 perplexity is transformers' on the same windows (both computed by the benchmark)
    assert abs(float(rows["float32"][2]) / float(rows["transformers float32 (reference)"][2]) - 1) < 1e-4
    assert float(rows["int8"][1]) < float(rows["float32"][1])  # fewer weight bytes
    assert rows["int8"][8].endswith("x")  # decode speed against float32 (the value is not asserted)
    assert "- int4 g128: not run: group_size=128 does not divide" in report


def test_cell_times_logs_every_cell_of_an_nbmake_run(tmp_path):
    """bench/cell_times.py (gpu_check's nbmake step loads it) logs each code cell's start and time as
    nbmake runs it; a cell interrupted before its end shows in the summary as not finished."""
    import nbformat
    from nbclient.exceptions import CellExecutionError

    notebook = tmp_path / "timed.ipynb"
    cells = [nbformat.v4.new_markdown_cell("# A"), nbformat.v4.new_code_cell("import time\ntime.sleep(0.3)")]
    cells.append(nbformat.v4.new_code_cell("x = 1"))
    nbformat.write(nbformat.v4.new_notebook(cells=cells), notebook)
    log = tmp_path / "cell_times.tsv"
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-p", "bench.cell_times", "--nbmake", "-q"]
        + [str(notebook)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "CELL_TIMES": str(log)},
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    lines = [line.split("\t") for line in log.read_text().splitlines()]
    assert [line[:2] for line in lines] == [["timed", "1"], ["timed", "1"], ["timed", "2"], ["timed", "2"]]
    assert lines[0][2] == "started" and float(lines[1][2]) >= 0.3 and lines[1][3] == "import time"

    sys.path.insert(0, os.path.join(ROOT, "bench"))
    try:
        import cell_times
    finally:
        sys.path.remove(os.path.join(ROOT, "bench"))

    # this process stopped inside cell 4 (a cancelled task): no end line
    async def interrupted(client, cell, cell_index):
        raise asyncio.CancelledError

    cell_times._notebook = "timed"
    with pytest.raises(asyncio.CancelledError):
        asyncio.run(
            cell_times._timed(interrupted, str(log))(None, nbformat.v4.new_code_cell("while True: pass"), 4)
        )

    # the kernel's error as nbclient raises it (after a SIGINT: DeadKernelError)
    async def failed(client, cell, cell_index):
        raise CellExecutionError("Traceback ...", "ZeroDivisionError", "division by zero")

    with pytest.raises(CellExecutionError):
        asyncio.run(cell_times._timed(failed, str(log))(None, nbformat.v4.new_code_cell("1 / 0"), 5))
    table = cell_times.summary(str(log))
    assert "| timed | 4 | **not finished** | `while True: pass` |" in table
    assert re.search(r"\| timed \| 5 \| [0-9.]+ \(ZeroDivisionError\) \| `1 / 0` \|", table), table
    assert table.index("not finished") < table.index("| timed | 1 | ")


def test_gpu_check_runs_the_steps_asked_for(tmp_path):
    """bench/gpu_check.sh --local with GPU_CHECK_STEPS: an unknown step is refused in one line before
    anything runs; an empty list runs only env and smoke (no checkpoint is written, no chapter run)."""
    script = os.path.join(ROOT, "bench", "gpu_check.sh")
    env = {**os.environ, "GPU_CHECK_PYTHON": sys.executable, "OUT": str(tmp_path / "out")}
    refused = subprocess.run(
        ["bash", script, "--local"],
        env={**env, "GPU_CHECK_STEPS": "bench nbmakes"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert refused.returncode == 2
    assert "unknown step 'nbmakes'" in refused.stdout + refused.stderr
    assert "=== env" not in refused.stdout
    done = subprocess.run(
        ["bash", script, "--local"],
        env={**env, "GPU_CHECK_STEPS": "", "GPU_CHECK_LAYERS": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:]
    summary = (tmp_path / "out" / "summary.md").read_text()
    print(summary)
    rows = [
        line.split("|")[1].strip() for line in summary.splitlines() if re.match(r"\| \w+ \| \d+ \|", line)
    ]
    assert rows == ["env", "smoke"]
    assert "Steps asked for (GPU_CHECK_STEPS): none" in summary
    assert not os.path.exists(os.path.join(ROOT, "_build", "gpu-check-llama-1b-shape-1"))


def test_gpu_kit_follows_requirements_for_the_gpu_machine_and_names_what_does_not_fit(tmp_path):
    """bench/gpu_kit.py's decisions, without the network: which requirements apply on the GPU machine
    (CPython 3.12, Linux), which names it carries, and the one-line reasons it refuses a kit."""
    import zipfile

    from packaging.requirements import Requirement

    sys.path.insert(0, os.path.join(ROOT, "bench"))
    try:
        import gpu_kit
    finally:
        sys.path.remove(os.path.join(ROOT, "bench"))

    wheel = tmp_path / "demo-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr(
            "demo-1.0.dist-info/METADATA",
            "Metadata-Version: 2.1\nName: demo\nVersion: 1.0\n"
            'Requires-Dist: old; python_version < "3.12"\n'
            'Requires-Dist: tensorflow-text>=2.20; platform_system != "Windows"\n'
            'Requires-Dist: pytest; extra == "test"\n'
            "Requires-Dist: nbmake>=1.5\n",
        )
    kept = gpu_kit.needed(gpu_kit.wheel_requirements(wheel))
    assert [str(r) for r in kept] == ['tensorflow-text>=2.20; platform_system != "Windows"', "nbmake>=1.5"]
    # TensorFlow never; nbmake, which the image lacks, always
    assert [gpu_kit.carried(r.name) for r in kept] == [False, True]
    assert not gpu_kit.carried("httpx") and gpu_kit.carried("transformers")  # in the image; a tested version

    fits = gpu_kit.conflicts({"nbmake": "1.5.5"}, {"demo": kept})
    assert fits == []
    too_new = gpu_kit.conflicts(
        {"transformers": "5.25.0"},
        {"transformers": [Requirement("huggingface-hub>=2.4.0,<3.0"), Requirement("httpx2")]},
    )
    assert too_new == [
        "transformers needs huggingface-hub<3.0,>=2.4.0, the image has 1.33.0",
        "transformers needs httpx2, which neither the kit nor the image has",
    ]

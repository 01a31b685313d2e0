"""The command line: the main job, and one clear line (no traceback) for bad input."""

import os
import platform
import shutil
import subprocess
import sys

import pytest
from safetensors.numpy import load_file, save_file

from llama_jax.cli import huge_page_environment, transparent_huge_pages


def run_cli(*args, env=None):
    return subprocess.run(
        [sys.executable, "-m", "llama_jax", *args],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "TQDM_DISABLE": "1", **(env or {})},
    )


def test_generate_answers_paris(smollm2_dir):
    result = run_cli("generate", "The capital of France is", "--max-new-tokens", "8")
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout


def test_chat_mode(smollm2_dir):
    result = run_cli("generate", "What is the capital of France?", "--chat", "--max-new-tokens", "16")
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout


def test_missing_model_is_one_line():
    result = run_cli("generate", "--model", "/nonexistent", "x")
    assert result.returncode == 2
    assert result.stderr.strip() == "error: no checkpoint directory at /nonexistent"


def test_checkpoint_with_a_tensor_removed_is_one_line(tiny_checkpoints, tmp_path):
    directory = shutil.copytree(tiny_checkpoints["untied"], tmp_path / "ckpt")
    tensors = load_file(directory / "model.safetensors")
    del tensors["model.layers.0.self_attn.k_proj.weight"]
    save_file(tensors, directory / "model.safetensors")
    result = run_cli("generate", "--model", str(directory), "x")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr
    assert lines[0] == f"error: {directory}: missing 1 tensor(s): model.layers.0.self_attn.k_proj.weight"


def test_generate_on_a_mesh_of_three_devices(smollm2_dir):
    env = {"JAX_NUM_CPU_DEVICES": "3"}  # three virtual CPU devices in the CLI's process
    result = run_cli(
        "generate", "The capital of France is", "--max-new-tokens", "8", "--mesh", "batch=1,model=3", env=env
    )
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout
    result = run_cli("generate", "x", "--mesh", "batch=1,model=2", env=env)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "cannot be split evenly over mesh axis 'model' of size 2" in result.stderr
    result = run_cli("generate", "x", "--mesh", "model=4", env=env)
    assert result.returncode == 2
    assert result.stderr.strip() == "error: mesh batch=1 x model=4 needs 4 devices; 3 are available"


def test_chat_with_piped_stdin_keeps_the_conversation(smollm2_dir):
    lines = "What is the capital of France?\n/reset\nWhat is the capital of Germany?\nAnd of Italy?\n"
    result = subprocess.run(
        [sys.executable, "-m", "llama_jax", "chat", "--max-new-tokens", "24"],
        input=lines,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "TQDM_DISABLE": "1"},
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "> What is the capital of France?" in out and "(conversation cleared)" in out
    france, rest = out.split("(conversation cleared)")
    assert "Paris" in france
    germany, italy = rest.split("> And of Italy?")
    assert "Berlin" in germany and "Rome" in italy  # "And of Italy?" only makes sense with the history


def test_help_has_examples_and_version():
    result = run_cli("--help")
    assert result.returncode == 0 and "examples:" in result.stdout and "llama_jax chat" in result.stdout
    result = run_cli("--version")
    assert result.returncode == 0 and result.stdout.startswith("llama_jax ")


def test_generate_with_the_gguf_kept_quantized_equals_the_python_api(smollm2_dir):
    """`--quantize gguf` runs on the bundled file's own Q4_1/Q8_0 blocks: its greedy text is the one
    `from_gguf(..., keep_quantized=True)` gives through `generate_text`."""
    import jax.numpy as jnp

    import llama_jax

    prompt = "The capital of France is"
    result = run_cli("generate", prompt, "--max-new-tokens", "12", "--quantize", "gguf")
    assert result.returncode == 0, result.stderr
    path = llama_jax.checkpoints.bundled_gguf_path()
    model = llama_jax.convert.from_gguf(path, jnp.float32, keep_quantized=True, progress=False)
    expected = llama_jax.generate_text(
        model, llama_jax.load_tokenizer(smollm2_dir), prompt, max_new_tokens=12
    )
    assert "Paris" in expected
    assert result.stdout.strip() == expected.strip()


def test_generate_int8_on_a_mesh_equals_the_python_api(smollm2_dir):
    """`--quantize int8 --mesh ...` quantizes the weights where the mesh put them (several devices:
    tests/sharded_checks.py); its greedy text is the one-device int8 model's."""
    import jax.numpy as jnp

    import llama_jax

    prompt = "The capital of France is"
    result = run_cli(
        "generate", prompt, "--max-new-tokens", "12", "--quantize", "int8", "--mesh", "batch=1,model=1"
    )
    assert result.returncode == 0, result.stderr
    model = llama_jax.quantize(
        llama_jax.from_pretrained(smollm2_dir, dtype=jnp.float32, progress=False), bits=8, embeddings=True
    )
    expected = llama_jax.generate_text(
        model, llama_jax.load_tokenizer(smollm2_dir), prompt, max_new_tokens=12
    )
    assert "Paris" in expected
    assert result.stdout.strip() == expected.strip()


def test_quantize_errors_are_one_line():
    result = run_cli("generate", "x", "--quantize", "gguf", "--model", "/tmp")
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "error: --quantize gguf keeps a GGUF file's blocks, and --model /tmp is not a .gguf file"
    )
    result = run_cli("generate", "x", "--quantize", "gguf", "--mesh", "batch=1,model=1")
    assert result.returncode == 2
    assert (
        result.stderr.strip() == "error: --quantize gguf and --mesh cannot be combined yet: drop one of them"
    )
    result = run_cli("generate", "x", "--quantize", "int3")
    assert result.returncode == 2 and "invalid choice: 'int3'" in result.stderr


def test_huge_page_environment_decides_from_glibc_the_kernel_and_the_user():
    on = "glibc.malloc.hugetlb=1"
    assert huge_page_environment({}, ("glibc", "2.36"), "madvise") == {"GLIBC_TUNABLES": on}
    kept = huge_page_environment({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, ("glibc", "2.39"), "madvise")
    assert kept == {"GLIBC_TUNABLES": f"glibc.malloc.arena_max=2:{on}"}
    assert (
        huge_page_environment({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, ("glibc", "2.36"), "madvise")
        is None
    )
    assert huge_page_environment({}, ("glibc", "2.34"), "madvise") is None  # the tunable came in 2.35
    assert huge_page_environment({}, ("glibc", "2.36"), "always") is None  # huge pages without asking
    assert huge_page_environment({}, ("glibc", "2.36"), "never") is None
    assert huge_page_environment({}, ("glibc", "2.36"), None) is None  # no transparent huge pages at all
    assert huge_page_environment({}, ("", ""), "madvise") is None  # musl, or not Linux
    assert huge_page_environment({}, ("glibc", ""), "madvise") is None  # no version to read


def test_a_training_command_restarts_itself_with_huge_pages():
    """``run()`` (what ``llama-jax`` and ``python -m llama_jax`` call) replaces the process with the same
    command line and the tunable set, once; here the command line is a ``-c`` script that prints what it
    sees each time it starts, then fails on a missing data file with the usual one line."""
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    if huge_page_environment(env, platform.libc_ver(), transparent_huge_pages()) is None:
        pytest.skip(
            f"no restart on this machine: {platform.libc_ver()}, huge pages {transparent_huge_pages()}"
        )
    script = (
        "import os, sys; print('start', os.environ.get('GLIBC_TUNABLES'), file=sys.stderr, flush=True); "
        "sys.argv = ['llama-jax', 'finetune', '--data', '/nonexistent.jsonl', '--output', '/nonexistent/run']; "
        "from llama_jax.cli import run; run()"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env
    )
    lines = result.stderr.strip().splitlines()
    assert lines[:2] == ["start None", "start glibc.malloc.hugetlb=1"], result.stderr
    assert result.returncode == 2 and lines[-1].startswith("error: ") and len(lines) == 3, result.stderr

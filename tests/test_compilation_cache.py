"""The compilation cache: a second process finds the generate programs (plain and streamed) that the first
one compiled in JAX's persistent cache, and compiles none of them again. Checked with JAX's log lines and
the cache directory, never timing."""

import os
import stat
import subprocess
import sys

import llama_jax

SCRIPT = """
import logging, sys
import numpy as np
import jax
import jax.numpy as jnp
import llama_jax

class Record(logging.Handler):
    def emit(self, record):
        print("LOG", record.getMessage().splitlines()[0][:300])

jax.config.update("jax_log_compiles", True)  # "Finished tracing _prefill ...", "Compiling jit(_prefill) ..."
logger = logging.getLogger("jax")
logger.setLevel(logging.DEBUG)
logger.addHandler(Record())
print("DIR", llama_jax.enable_compilation_cache(sys.argv[2]))
model = llama_jax.from_pretrained(sys.argv[1], dtype=jnp.float32, progress=False)
plain = llama_jax.generate(model, np.array([[5, 6, 7]]), max_new_tokens=6, eos_token_id=())
streamed = []
llama_jax.generate(model, np.array([[5, 6, 7]]), max_new_tokens=6, eos_token_id=(),
                   callback=lambda step, tokens: streamed.append(int(tokens[0])))
assert streamed == plain[0].tolist()
print("NAIVE")
naive = llama_jax.generate_naive(model, np.array([[5, 6, 7]]), max_new_tokens=6, eos_token_id=())
assert (naive == plain).all()
print("TOKENS", plain[0].tolist())
"""


def run(checkpoint, cache_dir, env=None):
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT, checkpoint, str(cache_dir)],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, **(env or {})},
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


def logged(lines, kind, program):
    """Log lines of JAX saying `kind` ("hit", "MISS", "Finished tracing", "Compiling") for `program`."""
    return [line for line in lines if kind in line and program in line]


def test_a_second_process_finds_the_generate_programs(tiny_checkpoints, tmp_path):
    checkpoint, cache_dir = tiny_checkpoints["untied"], tmp_path / "xla"
    first = run(checkpoint, cache_dir)
    assert f"DIR {cache_dir}" in first
    assert stat.S_IMODE(os.stat(cache_dir).st_mode) == 0o700  # private to the user
    # the prefill, the plain decode (whole budget in one call) and the streamed decode (a few steps a call)
    assert len(logged(first, "Compiling", "_prefill")) == 1
    assert len(logged(first, "Compiling", "_decode")) == 2
    entries = sorted(os.listdir(cache_dir))
    for program in ("jit__prefill-", "jit__decode-", "jit__full_forward-"):
        assert any(e.startswith(program) for e in entries), (program, entries)

    second = run(checkpoint, cache_dir)
    for program in ("_prefill", "_decode", "_full_forward"):  # served by the cache, compiled by no one
        assert logged(second, "hit", program), program
        assert not logged(second, "MISS", program), program
    assert sorted(os.listdir(cache_dir)) == entries
    assert [line for line in first if line.startswith("TOKENS")] == [
        line for line in second if line.startswith("TOKENS")
    ]


def test_the_environment_variable_turns_it_off(tiny_checkpoints, tmp_path, monkeypatch):
    monkeypatch.setenv("LLAMA_JAX_NO_COMPILATION_CACHE", "1")
    assert llama_jax.enable_compilation_cache(str(tmp_path / "xla")) is None
    assert not (tmp_path / "xla").exists()
    lines = run(tiny_checkpoints["untied"], tmp_path / "xla2", env={"LLAMA_JAX_NO_COMPILATION_CACHE": "1"})
    assert "DIR None" in lines and not (tmp_path / "xla2").exists()
    assert not logged(lines, "hit", "jit_")


def test_default_directory_is_under_the_cache_root(monkeypatch, tmp_path):
    monkeypatch.delenv("LLAMA_JAX_NO_COMPILATION_CACHE", raising=False)
    monkeypatch.setenv("LLAMA_JAX_CACHE", str(tmp_path))
    import jax

    before = jax.config.jax_compilation_cache_dir, jax.config.jax_persistent_cache_min_compile_time_secs
    try:
        assert llama_jax.enable_compilation_cache() == str(tmp_path / "xla")
        assert jax.config.jax_compilation_cache_dir == str(tmp_path / "xla")
    finally:  # nothing compiled meanwhile: the cache is only set up at the first compilation
        jax.config.update("jax_compilation_cache_dir", before[0])
        jax.config.update("jax_persistent_cache_min_compile_time_secs", before[1])

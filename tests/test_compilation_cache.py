"""The persistent compilation cache: a second process finds the generate programs (plain and streamed)
that the first one compiled. Checked with JAX's own cache log lines and the cache directory, never timing."""

import os
import stat
import subprocess
import sys

import llama_jax

SCRIPT = """
import logging, sys
import numpy as np
import jax.numpy as jnp
import llama_jax

class Record(logging.Handler):
    def emit(self, record):
        message = record.getMessage()
        if "ersistent compilation cache" in message or "PERSISTENT COMPILATION CACHE" in message:
            print("LOG", message)

logger = logging.getLogger("jax._src.compiler")
logger.setLevel(logging.DEBUG)
logger.addHandler(Record())
print("DIR", llama_jax.enable_compilation_cache(sys.argv[2]))
model = llama_jax.from_pretrained(sys.argv[1], dtype=jnp.float32, progress=False)
plain = llama_jax.generate(model, np.array([[5, 6, 7]]), max_new_tokens=6, eos_token_id=())
streamed = []
llama_jax.generate(model, np.array([[5, 6, 7]]), max_new_tokens=6, eos_token_id=(),
                   callback=lambda step, tokens: streamed.append(int(tokens[0])))
assert streamed == plain[0].tolist()
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
    """Log lines of JAX's compiler saying `kind` ("hit" or "MISS") for jit(program)."""
    return [line for line in lines if kind in line and f"'jit_{program}'" in line]


def test_a_second_process_finds_the_generate_programs(tiny_checkpoints, tmp_path):
    checkpoint, cache_dir = tiny_checkpoints["untied"], tmp_path / "xla"
    first = run(checkpoint, cache_dir)
    assert f"DIR {cache_dir}" in first
    assert stat.S_IMODE(os.stat(cache_dir).st_mode) == 0o700  # private to the user
    # the prefill, the plain decode (whole budget in one call) and the streamed decode (a few steps a call)
    assert len(logged(first, "MISS", "_prefill")) == 1
    assert len(logged(first, "MISS", "_decode")) == 2
    entries = os.listdir(cache_dir)
    assert sum(e.startswith("jit__prefill-") for e in entries) == 1
    assert sum(e.startswith("jit__decode-") for e in entries) == 2

    second = run(checkpoint, cache_dir)
    assert len(logged(second, "hit", "_prefill")) == 1
    assert len(logged(second, "hit", "_decode")) == 2
    assert not logged(second, "MISS", "_prefill") and not logged(second, "MISS", "_decode")
    assert sorted(os.listdir(cache_dir)) == sorted(entries)  # nothing compiled again
    assert [line for line in first if line.startswith("TOKENS")] == [
        line for line in second if line.startswith("TOKENS")
    ]


def test_the_environment_variable_turns_it_off(tiny_checkpoints, tmp_path, monkeypatch):
    monkeypatch.setenv("LLAMA_JAX_NO_COMPILATION_CACHE", "1")
    assert llama_jax.enable_compilation_cache(str(tmp_path / "xla")) is None
    assert not (tmp_path / "xla").exists()
    lines = run(tiny_checkpoints["untied"], tmp_path / "xla2", env={"LLAMA_JAX_NO_COMPILATION_CACHE": "1"})
    assert "DIR None" in lines and not (tmp_path / "xla2").exists()
    assert not logged(lines, "hit", "_prefill")


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

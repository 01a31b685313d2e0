"""The compilation cache: a second process finds the generate programs (plain and streamed) that the first
one compiled, kept whole (``llama_jax.programs``), and neither traces nor compiles them again; JAX's own
persistent cache keeps the others. Checked with JAX's log lines and the cache directory, never
timing."""

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


def programs_in(cache_dir):
    return sorted(os.listdir(cache_dir / "programs"))


def test_a_second_process_finds_the_generate_programs(tiny_checkpoints, tmp_path):
    checkpoint, cache_dir = tiny_checkpoints["untied"], tmp_path / "xla"
    first = run(checkpoint, cache_dir)
    assert f"DIR {cache_dir}" in first
    assert stat.S_IMODE(os.stat(cache_dir).st_mode) == 0o700  # private to the user
    # the prefill, the plain decode (whole budget in one call) and the streamed decode (a few steps a call)
    assert len(logged(first, "Finished tracing", "_prefill")) == 1
    assert len(logged(first, "Finished tracing", "_decode")) == 2
    kept = programs_in(cache_dir)
    assert sum(e.startswith("_prefill-") for e in kept) == 1
    assert sum(e.startswith("_decode-") for e in kept) == 2
    assert sum(e.startswith("abstract-model-") for e in kept) == 1  # from_pretrained's, kept too
    # kept whole here, not also in JAX's cache (which could not serve them for serializing again) ...
    assert not [e for e in os.listdir(cache_dir) if e.startswith(("jit__prefill", "jit__decode"))]
    # ... which holds the other programs (here generate_naive's forward pass)
    others = sorted(e for e in os.listdir(cache_dir) if e != "programs")
    assert any(e.startswith("jit__full_forward-") for e in others)

    second = run(checkpoint, cache_dir)
    for program in ("_prefill", "_decode"):  # loaded, neither traced nor compiled
        assert not logged(second, "Finished tracing", program) and not logged(second, "Compiling", program)
    # nothing at all is traced before generate_naive (from_pretrained's abstract model comes from disk too),
    # whose programs JAX's cache keeps compiled only
    assert not [line for line in second[: second.index("NAIVE")] if "Finished tracing" in line]
    assert logged(second[second.index("NAIVE") :], "Finished tracing", "_full_forward")
    assert logged(second, "hit", "_full_forward")  # JAX's cache serves the others
    assert (
        programs_in(cache_dir) == kept
        and sorted(e for e in os.listdir(cache_dir) if e != "programs") == others
    )
    assert [line for line in first if line.startswith("TOKENS")] == [
        line for line in second if line.startswith("TOKENS")
    ]

    # a damaged file (a killed process, another format) is compiled and written again, whole
    for name in kept:
        (cache_dir / "programs" / name).write_bytes(b"not a program")
    third = run(checkpoint, cache_dir)
    assert len(logged(third, "Finished tracing", "_prefill")) == 1
    assert programs_in(cache_dir) == kept
    assert all((cache_dir / "programs" / name).read_bytes() != b"not a program" for name in kept)
    assert [line for line in third if line.startswith("TOKENS")] == [
        line for line in first if line.startswith("TOKENS")
    ]


def test_the_key_covers_jax_settings_shapes_and_static_arguments():
    """A program compiled under other settings (here the float32 matmul precision), for other shapes or
    other static arguments is never reused."""
    import jax
    import jax.numpy as jnp

    from llama_jax import programs

    args = (jnp.ones((2, 3)), 4)
    leaves, structure = jax.tree_util.tree_flatten(args)
    avals = tuple((jax.typeof(leaf), getattr(leaf, "sharding", None)) for leaf in leaves)
    key = programs._disk_key(structure, avals, {"steps": 4})
    assert key == programs._disk_key(structure, avals, {"steps": 4})
    assert key != programs._disk_key(structure, avals, {"steps": 8})
    other = tuple((jax.typeof(leaf), None) for leaf in jax.tree.leaves((jnp.ones((2, 4)), 4)))
    assert key != programs._disk_key(structure, other, {"steps": 4})
    with jax.default_matmul_precision("highest"):
        assert key != programs._disk_key(structure, avals, {"steps": 4})


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

    from llama_jax import programs

    before = jax.config.jax_compilation_cache_dir, jax.config.jax_persistent_cache_min_compile_time_secs
    kept_before = programs._directory
    try:
        assert llama_jax.enable_compilation_cache() == str(tmp_path / "xla")
        assert jax.config.jax_compilation_cache_dir == str(tmp_path / "xla")
        assert programs._directory == str(tmp_path / "xla")
    finally:  # nothing compiled meanwhile: the cache is only set up at the first compilation
        jax.config.update("jax_compilation_cache_dir", before[0])
        jax.config.update("jax_persistent_cache_min_compile_time_secs", before[1])
        programs.enable(kept_before)

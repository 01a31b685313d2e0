"""The book: chapter pairs in sync, one repository URL everywhere, and a real build looked at in a browser.

``make test`` executes every chapter twice, on two models: ``pytest --nbmake book`` on the bundled
SmolLM2, and the book build below on a 2-layer checkpoint of Llama 3.2 1B's shape (``llama_1b_shape.py``:
32/8 heads, hidden 2048, llama3 RoPE scaling, tied head, random weights), so every chapter's claims are
checked on the headline model's shape too. ``make test-1b-shape`` runs nbmake on all 16 layers.
"""

from __future__ import annotations

import os
import pathlib
import re
import shutil
import subprocess
import sys

import jupytext
import numpy as np
import pytest
import yaml

ROOT = pathlib.Path(__file__).resolve().parents[1]
BOOK = ROOT / "book"
CHAPTERS = sorted(BOOK.glob("[0-9][0-9]_*.md"))
sys.path.insert(0, str(BOOK / "_ext"))
from notebook_badges import badges, notebook_url  # noqa: E402

CONFIG = yaml.safe_load((ROOT / "_config.yml").read_text())
REPO_URL = CONFIG["repository"]["url"]
BRANCH = CONFIG["repository"]["branch"]


def docname(chapter: pathlib.Path) -> str:
    return chapter.relative_to(ROOT).with_suffix("").as_posix()


def code_cells(notebook) -> list[str]:
    return [cell.source for cell in notebook.cells if cell.cell_type == "code"]


def test_there_are_chapters():
    assert len(CHAPTERS) >= 8, [c.name for c in CHAPTERS]


@pytest.mark.parametrize("chapter", CHAPTERS, ids=lambda p: p.stem)
def test_pair_in_sync(chapter):
    """The committed .ipynb holds exactly the .md's cells (run `make sync` after editing a chapter), no outputs."""
    paired = chapter.with_suffix(".ipynb")
    assert paired.exists(), f"{paired.name} is missing: run `make sync`"
    md, ipynb = jupytext.read(chapter), jupytext.read(paired)
    md_cells = [(c.cell_type, c.source) for c in md.cells]
    ipynb_cells = [(c.cell_type, c.source) for c in ipynb.cells]
    assert md_cells == ipynb_cells, f"{paired.name} differs from {chapter.name}: run `make sync`"
    for cell in ipynb.cells:
        if cell.cell_type == "code":
            assert not cell.outputs and cell.execution_count is None, f"{paired.name} has outputs committed"
    assert ipynb.metadata["kernelspec"]["name"] == "python3"


def test_every_chapter_in_the_toc():
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    listed = {entry["file"] for part in toc["parts"] for entry in part["chapters"]}
    assert listed == {docname(c) for c in CHAPTERS}


@pytest.mark.parametrize("chapter", CHAPTERS, ids=lambda p: p.stem)
def test_install_cell(chapter):
    """Every chapter opens (in Colab/Kaggle) with the same install cell, from this repository and branch."""
    first = code_cells(jupytext.read(chapter))[0]
    reference = code_cells(jupytext.read(CHAPTERS[0]))[0]
    assert first == reference, (
        f"{chapter.name}: the first code cell must be the install cell of {CHAPTERS[0].name}"
    )
    assert f"git+{REPO_URL}@{BRANCH}#subdirectory=companion" in first
    assert "find_spec" in first  # installs only what is missing, never upgrades the reader's set-up


def test_readme_links_every_chapter_from_the_configured_repository():
    readme = (ROOT / "README.md").read_text()
    for chapter in CHAPTERS:
        for link in re.findall(r"\]\((https://[^)]+)\)", badges(REPO_URL, BRANCH, docname(chapter))):
            assert link in readme, f"README lacks {link}"
    other_repos = {u for u in re.findall(r"https://github\.com/[\w.-]+/[\w.-]+", readme)} - {REPO_URL}
    assert not other_repos, f"README names another repository: {other_repos}"


def test_badge_urls():
    assert (
        notebook_url("https://github.com/o/r", "main", "book/01_x")
        == "https://github.com/o/r/blob/main/book/01_x.ipynb"
    )
    assert "colab.research.google.com/github/o/r/blob/main/book/01_x.ipynb" in badges(
        "https://github.com/o/r", "main", "book/01_x"
    )


# ---------------------------------------------------------------------------------------------------
# The build, and what a real browser shows of it


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
PLOTTING_CHAPTERS = {"04_rope", "05_attention"}  # chapters whose figures the test looks for


@pytest.fixture(scope="module")
def built_book(tmp_path_factory) -> pathlib.Path:
    """``jupyter-book build . -W -n --keep-going`` into a temporary folder, every chapter executed with
    ``LLAMA_JAX_MODEL`` pointing at a 2-layer checkpoint of Llama 3.2 1B's shape (a cell that raises
    fails the build)."""
    from llama_1b_shape import write_llama_1b_shape

    out = tmp_path_factory.mktemp("book")
    checkpoint = write_llama_1b_shape(tmp_path_factory.mktemp("llama-3.2-1b-shape-2-layers"), num_layers=2)
    jupyter_book = pathlib.Path(sys.executable).with_name("jupyter-book")
    result = subprocess.run(
        [str(jupyter_book), "build", str(ROOT), "--path-output", str(out), "-W", "-n", "--keep-going"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "LLAMA_JAX_MODEL": checkpoint},
    )
    tail = (result.stdout + result.stderr)[-4000:]
    assert result.returncode == 0, f"book build failed:\n{tail}"
    return out / "_build" / "html"


def test_build_has_every_chapter_executed(built_book):
    assert "llama-3.2-1b-shape-2-layers" in (built_book / "book" / "00_introduction.html").read_text()
    for chapter in CHAPTERS:
        page = built_book / "book" / f"{chapter.stem}.html"
        assert page.exists(), f"{page} not built"
        html = page.read_text()
        assert "cell_output" in html, f"{chapter.stem}: no executed outputs on the page"
        assert "colab.research.google.com/github/" in html and "kaggle.com/kernels/welcome" in html, (
            chapter.stem
        )
        assert "Traceback" not in html, f"{chapter.stem}: a traceback is on the page"
        if chapter.stem in PLOTTING_CHAPTERS:
            assert re.search(r'<img [^>]*src="[^"]*\.png"', html), f"{chapter.stem}: no figure on the page"


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (.ci/run installs Debian's chromium)")
@pytest.mark.parametrize("stem", ["00_introduction", "04_rope"])
def test_headless_browser_renders_code_outputs_and_figures(built_book, stem, tmp_path):
    page = (built_book / "book" / f"{stem}.html").as_uri()
    common = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}",
    ]
    dom = subprocess.run(common + ["--dump-dom", page], capture_output=True, text=True, timeout=120).stdout
    assert 'class="highlight' in dom, "no highlighted code in the rendered page"
    assert "cell_output" in dom, "no cell outputs in the rendered page"
    shot = tmp_path / f"{stem}.png"
    subprocess.run(
        common + [f"--screenshot={shot}", "--window-size=1280,2400", page],
        capture_output=True,
        timeout=120,
        check=True,
    )
    from PIL import Image

    pixels = np.asarray(Image.open(shot).convert("L"), dtype=np.float32)
    dark = (pixels < 128).mean()  # text, code and plot lines on a white page
    assert pixels.std() > 20 and 0.005 < dark < 0.5, (
        f"{stem}: the screenshot looks blank (std {pixels.std():.1f})"
    )
    if stem in PLOTTING_CHAPTERS:
        images = re.findall(r'<img [^>]*src="([^"]+\.png)"', dom)
        assert images, f"{stem}: the browser shows no figure"
    keep = os.environ.get("LLAMA_JAX_SCREENSHOTS")
    if keep:  # a place to look at them by eye
        shutil.copy(shot, pathlib.Path(keep) / shot.name)

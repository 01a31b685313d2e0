"""``python -m llama_jax generate "PROMPT"``, ``chat``, ``finetune`` and ``merge``: the main jobs from the
command line, with mlx-lm's names and data formats.

Errors in what the user gave (a missing checkpoint, a broken config, a prompt that is too long) or
in the installation (a missing optional dependency) print one line, ``error: ...``, and exit with
status 2; nothing else is caught. Compiled programs are kept on disk (``llama_jax.enable_compilation_cache``,
JAX's persistent compilation cache), so only the first call on a machine compiles;
set ``LLAMA_JAX_NO_COMPILATION_CACHE=1`` to turn that off.

``finetune`` (``lora``) runs with glibc's large allocations in transparent huge pages
(``GLIBC_TUNABLES=glibc.malloc.hugetlb=1``; see ``huge_page_environment``): the program restarts itself
with that setting, which glibc reads only at start. Set ``GLIBC_TUNABLES`` yourself to choose otherwise.
"""

from __future__ import annotations

import argparse
import os
import platform
import signal
import sys

from . import __version__

EXAMPLES = """examples:
  python -m llama_jax generate "The capital of France is" --max-new-tokens 24
  python -m llama_jax generate "Write a haiku about JAX." --chat --temperature 0.7 --seed 1
  python -m llama_jax generate "Hello" --model meta-llama/Llama-3.2-1B-Instruct --dtype bfloat16
  python -m llama_jax generate "The capital of France is" --quantize gguf
  python -m llama_jax chat --system "You answer in one short sentence."
  printf 'What is the capital of France?\\nAnd of Italy?\\n' | python -m llama_jax chat
  python -m llama_jax finetune --data data/ --output run/ --steps 200 --batch 4
  python -m llama_jax finetune --data data/ --output run/ --steps 400 --resume
  python -m llama_jax generate "Hello" --chat --adapter run/
  python -m llama_jax merge --adapter run/ --output merged/

Without --model, the bundled SmolLM2-135M-Instruct is used (no network needed). Compiled programs
are cached under $LLAMA_JAX_CACHE/xla (default ~/.cache/llama_jax/xla): the first call on a machine
compiles, later ones start in seconds. LLAMA_JAX_NO_COMPILATION_CACHE=1 turns the cache off.
"""


QUANTIZE = ("int8", "int4", "gguf")


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        help="checkpoint directory, hub repo id or .gguf file (default: the bundled SmolLM2-135M-Instruct)",
    )
    parser.add_argument(
        "--dtype",
        choices=["auto", "float32", "bfloat16"],
        default="auto",
        help="parameter dtype; auto: float32 on CPU, bfloat16 on an accelerator",
    )
    parser.add_argument(
        "--adapter", metavar="DIR", help="a LoRA adapter in peft's format (what finetune writes) to apply"
    )
    parser.add_argument(
        "--quantize",
        choices=QUANTIZE,
        help="weight-only quantization: int8 (per output channel) or int4 (groups of 32), projections and "
        "embedding; gguf keeps a GGUF file's own Q8_0/Q4_0/Q4_1 blocks (the bundled file without --model)",
    )
    parser.add_argument("--temperature", type=float, default=0.0, help="0 (the default) decodes greedily")
    parser.add_argument("--top-k", type=int)
    parser.add_argument("--top-p", type=float)
    parser.add_argument("--seed", type=int, default=0)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m llama_jax",
        description="Llama 3.x in JAX from the command line: continue a prompt, or chat.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"llama_jax {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    gen = commands.add_parser(
        "generate",
        help="continue a prompt (or answer it, with --chat)",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    gen.add_argument("prompt")
    _add_model_options(gen)
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.add_argument("--chat", action="store_true", help="apply the tokenizer's chat template")
    gen.add_argument(
        "--mesh",
        metavar="batch=B,model=M",
        help="shard the model over B x M devices (tensor parallel over 'model', the batch over 'batch')",
    )
    chat = commands.add_parser(
        "chat",
        help="talk with an instruct model; the conversation's KV cache is kept between turns",
        description="One message per line. /reset starts over, /exit (or Ctrl-D) leaves, Ctrl-C stops "
        "the current answer and keeps the conversation. Reads piped stdin too.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_model_options(chat)
    chat.add_argument("--system", help="system prompt (default: the chat template's own, if any)")
    chat.add_argument("--max-new-tokens", type=int, default=256, help="at most this many tokens per answer")
    _add_finetune(commands)
    merge = commands.add_parser(
        "merge",
        help="fold a LoRA adapter into the model's weights and write a transformers checkpoint",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    merge.add_argument("--model", help="the adapter's base checkpoint or hub id (default: the bundled model)")
    merge.add_argument("--adapter", metavar="DIR", required=True, help="the adapter (peft's format)")
    merge.add_argument("--output", metavar="DIR", required=True, help="where the merged checkpoint goes")
    merge.add_argument(
        "--dtype", choices=["float32", "bfloat16"], default="float32", help="the merged weights' dtype"
    )
    return parser


def _add_finetune(commands) -> None:
    from .lora import TARGETS

    tune = commands.add_parser(
        "finetune",
        aliases=["lora"],
        help="train LoRA adapters on JSONL data (mlx-lm's formats); resumable",
        description="Data: a .jsonl file, or a directory with train.jsonl and an optional valid.jsonl; each "
        'line {"messages": [...]} (loss on the assistant turns), {"prompt": ..., "completion": ...} (loss on '
        'the completion) or {"text": ...} (loss on every token). OUTPUT receives the adapter in peft\'s '
        "format, the training state (orbax) and run.json; --resume continues a run from its last save.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    tune.add_argument("--model", help="checkpoint directory or hub repo id (default: the bundled model)")
    tune.add_argument("--data", required=True, metavar="PATH", help="a .jsonl file or a directory of them")
    tune.add_argument("--output", required=True, metavar="DIR", help="the run's directory")
    tune.add_argument("--rank", type=int, default=8)
    tune.add_argument("--alpha", type=float, default=16.0, help="the update is scaled by alpha / rank")
    tune.add_argument(
        "--targets", default=",".join(TARGETS), help="comma-separated projections to adapt (default: all)"
    )
    tune.add_argument("--steps", type=int, default=1000, help="optimizer steps in the whole run")
    tune.add_argument("--batch", type=int, default=4, help="rows per step (over every process and device)")
    tune.add_argument("--lr", type=float, default=1e-4, help="AdamW's learning rate")
    tune.add_argument("--schedule", choices=["constant", "cosine"], default="constant")
    tune.add_argument("--warmup", type=int, default=0, help="steps of linear warmup from 0")
    tune.add_argument("--max-length", type=int, default=2048, help="longer rows are cut (and counted)")
    tune.add_argument(
        "--mesh",
        metavar="batch=B,model=M",
        help="train on B x M devices: rows over 'batch', weights by --rules",
    )
    tune.add_argument(
        "--rules", choices=["tp", "fsdp"], default="tp", help="how the frozen weights are split on the mesh"
    )
    tune.add_argument(
        "--dtype",
        choices=["auto", "float32", "bfloat16"],
        default="auto",
        help="the frozen weights' dtype (adapters and loss stay float32); auto: float32 on CPU, else bfloat16",
    )
    tune.add_argument("--remat", action="store_true", help="recompute activations in the backward pass")
    tune.add_argument("--save-every", type=int, default=100, help="save the adapter and state every K steps")
    tune.add_argument("--eval-every", type=int, help="held-out loss every K steps (default: at each save)")
    tune.add_argument("--resume", action="store_true", help="continue the run in --output from its last save")
    tune.add_argument("--seed", type=int, default=0, help="the adapters' initialization and the data order")
    tune.add_argument(
        "--distributed",
        action="store_true",
        help="join a jax.distributed job (jax.distributed.initialize(); the coordinator from the environment)",
    )


def _load(args, mesh=None, rules=None):
    """The model (with ``--adapter`` applied, if given) and its tokenizer."""
    import jax
    import jax.numpy as jnp

    from .cache import enable_compilation_cache
    from .checkpoints import default_checkpoint, from_pretrained, resolve_checkpoint
    from .lora import load_adapter
    from .sharding import TENSOR_PARALLEL
    from .tokenizer import load_tokenizer

    enable_compilation_cache()
    dtype = args.dtype
    if dtype == "auto":
        dtype = "float32" if jax.default_backend() == "cpu" else "bfloat16"
    dtype, rules = jnp.dtype(dtype), rules or TENSOR_PARALLEL
    quantized = getattr(args, "quantize", None)
    if quantized == "gguf" and mesh is not None:  # (int8/int4 quantize the sharded weights where they lie)
        raise ValueError("--quantize gguf and --mesh cannot be combined yet: drop one of them")
    gguf_file = args.model if args.model and args.model.endswith(".gguf") else None
    if quantized == "gguf" and args.model and not gguf_file:
        raise ValueError(
            f"--quantize gguf keeps a GGUF file's blocks, and --model {args.model} is not a .gguf file"
        )
    if gguf_file or quantized == "gguf":
        from .checkpoints import bundled_gguf_path
        from .convert import from_gguf, tokenizer_from_gguf

        path = gguf_file or bundled_gguf_path()
        model = from_gguf(
            path, dtype, progress=False, mesh=mesh, rules=rules, keep_quantized=quantized == "gguf"
        )
        tokenizer = tokenizer_from_gguf(path) if gguf_file else load_tokenizer(default_checkpoint())
    else:
        directory = resolve_checkpoint(args.model) if args.model else default_checkpoint()
        model = from_pretrained(directory, dtype=dtype, mesh=mesh, rules=rules)
        tokenizer = load_tokenizer(directory)
    if quantized in ("int8", "int4"):
        from .quantize import quantize

        quantize(
            model, bits=int(quantized[3:]), group_size=32 if quantized == "int4" else None, embeddings=True
        )
    if getattr(args, "adapter", None):
        load_adapter(model, args.adapter)
    return model, tokenizer


def _sampling(args) -> dict:
    return dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)


def _generate(args) -> None:
    from .sharding import make_mesh, parse_mesh
    from .text import generate_text

    mesh = make_mesh(**parse_mesh(args.mesh)) if args.mesh else None
    model, tokenizer = _load(args, mesh)
    generate_text(
        model,
        tokenizer,
        args.prompt,
        chat=args.chat,
        max_new_tokens=args.max_new_tokens,
        stream=lambda piece: print(piece, end="", flush=True),
        **_sampling(args),
    )
    print()


def _chat(args) -> None:
    from .chat import ChatSession

    interactive = sys.stdin.isatty()
    if interactive:
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:
            pass
    model, tokenizer = _load(args)
    session = ChatSession(model, tokenizer, system=args.system)
    if interactive:
        print("Chat with the model: /reset starts over, /exit or Ctrl-D leaves, Ctrl-C stops an answer.")
    while True:
        try:
            line = input("> " if interactive else "")
        except EOFError:
            break
        except KeyboardInterrupt:  # at the prompt: a fresh line, as a shell does
            print()
            continue
        message = line.strip()
        if not message:
            continue
        if message in ("/exit", "/quit"):
            break
        if message == "/reset":
            session.reset()
            print("(conversation cleared)", flush=True)
            continue
        if not interactive:
            print(f"> {message}")
        _answer(session, message, args)
    if interactive:
        print()


def _answer(session, message: str, args) -> None:
    """One answer, streamed; Ctrl-C stops it (between decode calls) and keeps the conversation."""
    stopped = []
    previous = signal.signal(signal.SIGINT, lambda *_: stopped.append(True))
    try:
        session.ask(
            message,
            max_new_tokens=args.max_new_tokens,
            stream=lambda piece: print(piece, end="", flush=True),
            stop=lambda: bool(stopped),
            **_sampling(args),
        )
    except ValueError as e:  # the conversation no longer fits: say so, keep the loop going
        print(f"error: {e}", file=sys.stderr, flush=True)
        return
    finally:
        signal.signal(signal.SIGINT, previous)
    print(" [stopped]" if stopped else "", flush=True)


def _finetune(args) -> None:
    import jax

    from .sharding import FSDP, TENSOR_PARALLEL, make_mesh, parse_mesh
    from .train import finetune

    if args.distributed:
        jax.distributed.initialize()
    mesh = make_mesh(**parse_mesh(args.mesh)) if args.mesh else None
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    model, tokenizer = _load(args, mesh, FSDP if args.rules == "fsdp" else TENSOR_PARALLEL)
    result = finetune(
        model,
        tokenizer,
        args.data,
        args.output,
        base=args.model or _bundled_name(),
        rank=args.rank,
        alpha=args.alpha,
        targets=targets,
        steps=args.steps,
        batch_size=args.batch,
        learning_rate=args.lr,
        schedule=args.schedule,
        warmup=args.warmup,
        max_length=args.max_length,
        save_every=args.save_every,
        eval_every=args.eval_every,
        resume=args.resume,
        seed=args.seed,
        remat=args.remat,
    )
    if jax.process_index() != 0:  # in a job of several processes, the first one reports
        return
    done = result.steps - result.resumed_from
    print(
        f"trained steps {result.resumed_from + 1}-{result.steps} in {result.seconds:.1f} s "
        f"({result.tokens_per_second:,.0f} tokens/s; first step {result.first_step_seconds:.1f} s)"
        if done
        else f"{result.output} is already at step {result.steps}"
    )
    if result.held_out:
        first, last = min(result.held_out), max(result.held_out)
        print(
            f"held-out loss {result.held_out[first]:.4f} (step {first}) -> {result.held_out[last]:.4f} "
            f"(step {last})"
        )
    print(f"adapter: {result.output}")


def _bundled_name() -> str:
    from .checkpoints import default_checkpoint

    return default_checkpoint()


def _merge(args) -> None:
    import jax.numpy as jnp

    from .checkpoints import default_checkpoint, from_pretrained, resolve_checkpoint
    from .lora import load_adapter, merge_lora
    from .tokenizer import load_tokenizer
    from .weights import save_pretrained

    directory = resolve_checkpoint(args.model) if args.model else default_checkpoint()
    model = load_adapter(
        from_pretrained(directory, dtype=jnp.dtype(args.dtype), progress=False), args.adapter
    )
    save_pretrained(merge_lora(model), args.output, tokenizer=load_tokenizer(directory))
    print(f"merged checkpoint: {args.output}")


COMMANDS = {"generate": _generate, "chat": _chat, "finetune": _finetune, "lora": _finetune, "merge": _merge}


TRAINING_COMMANDS = ("finetune", "lora")


def huge_page_environment(environ, libc: tuple[str, str], thp_mode: str | None) -> dict | None:
    """The environment to restart a training command in, or None to run as is.

    A compiled train step allocates its temporaries (the activations kept for the backward pass: 2.4 GB
    for the bundled model at batch 8 x 128) as one block, every step. glibc serves a block that large
    with a fresh ``mmap``, and the kernel then faults it in 4 KiB page by page: 600,000 faults and 1.3 s
    of system time per 4 s step on our 2-core CPU. With ``glibc.malloc.hugetlb=1`` glibc asks for
    transparent huge pages on such mappings (``madvise``): 2 MiB pages, 2,000 faults per step, the step
    10 to 20% faster (bench/README.md). That takes glibc 2.35 or newer and a kernel whose transparent
    huge pages are on ``madvise`` (``thp_mode``: the selected word of
    /sys/kernel/mm/transparent_hugepage/enabled; with ``always`` large mappings get huge pages anyway,
    with ``never`` there are none). A ``GLIBC_TUNABLES`` that already names ``glibc.malloc.hugetlb`` is
    the user's choice and is kept."""
    name, version = libc
    tunables = environ.get("GLIBC_TUNABLES", "")
    if name != "glibc" or thp_mode != "madvise" or "glibc.malloc.hugetlb" in tunables:
        return None
    try:
        if tuple(int(part) for part in version.split(".")[:2]) < (2, 35):
            return None
    except ValueError:  # a version this cannot read: leave the process as it is
        return None
    return {**environ, "GLIBC_TUNABLES": ":".join(filter(None, [tunables, "glibc.malloc.hugetlb=1"]))}


def transparent_huge_pages() -> str | None:
    """This kernel's transparent huge page mode ("always", "madvise", "never"), or None without them."""
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            words = f.read().split()  # e.g. "always [madvise] never"
    except OSError:
        return None
    return next((w.strip("[]") for w in words if w.startswith("[")), None)


def training_environment() -> dict | None:
    """``huge_page_environment`` for this process on this machine: the environment ``finetune``
    restarts itself in, or None where it runs as it is."""
    if sys.platform != "linux":
        return None
    return huge_page_environment(os.environ, platform.libc_ver(), transparent_huge_pages())


def run() -> None:
    """The ``llama-jax`` program (and ``python -m llama_jax``): ``main`` on this process's command line,
    restarted first for a training command when ``huge_page_environment`` asks for it. (``main(argv)``
    itself never restarts the process: a test or a notebook may call it.)"""
    args = _parser().parse_args()  # --help and usage errors end here, before any restart
    environ = training_environment() if args.command in TRAINING_COMMANDS else None
    if environ is not None:
        os.execve(sys.executable, sys.orig_argv, environ)  # the same command; this process is replaced
    sys.exit(main())


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    try:
        COMMANDS[args.command](args)
    except (ValueError, OSError, ImportError) as e:  # CheckpointError and ConfigError are ValueErrors
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0

"""``python -m llama_jax generate "PROMPT"`` and ``python -m llama_jax chat``: the main jobs from the
command line.

Errors in what the user gave (a missing checkpoint, a broken config, a prompt that is too long) or
in the installation (a missing optional dependency) print one line, ``error: ...``, and exit with
status 2; nothing else is caught. Compiled programs are kept on disk (``llama_jax.enable_compilation_cache``,
JAX's persistent compilation cache), so only the first call on a machine compiles;
set ``LLAMA_JAX_NO_COMPILATION_CACHE=1`` to turn that off.
"""

from __future__ import annotations

import argparse
import signal
import sys

from . import __version__

EXAMPLES = """examples:
  python -m llama_jax generate "The capital of France is" --max-new-tokens 24
  python -m llama_jax generate "Write a haiku about JAX." --chat --temperature 0.7 --seed 1
  python -m llama_jax generate "Hello" --model meta-llama/Llama-3.2-1B-Instruct --dtype bfloat16
  python -m llama_jax chat --system "You answer in one short sentence."
  printf 'What is the capital of France?\\nAnd of Italy?\\n' | python -m llama_jax chat

Without --model, the bundled SmolLM2-135M-Instruct is used (no network needed). Compiled programs
are cached under $LLAMA_JAX_CACHE/xla (default ~/.cache/llama_jax/xla): the first call on a machine
compiles, later ones start in seconds. LLAMA_JAX_NO_COMPILATION_CACHE=1 turns the cache off.
"""


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", help="checkpoint directory or hub repo id (default: the bundled SmolLM2-135M-Instruct)"
    )
    parser.add_argument(
        "--dtype",
        choices=["auto", "float32", "bfloat16"],
        default="auto",
        help="parameter dtype; auto: float32 on CPU, bfloat16 on an accelerator",
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
    return parser


def _load(args, mesh=None):
    import jax
    import jax.numpy as jnp

    from .cache import enable_compilation_cache
    from .checkpoints import default_checkpoint, from_pretrained, resolve_checkpoint
    from .tokenizer import load_tokenizer

    enable_compilation_cache()
    directory = resolve_checkpoint(args.model) if args.model else default_checkpoint()
    dtype = args.dtype
    if dtype == "auto":
        dtype = "float32" if jax.default_backend() == "cpu" else "bfloat16"
    model = from_pretrained(directory, dtype=jnp.dtype(dtype), mesh=mesh)
    return model, load_tokenizer(directory)


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


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    try:
        _chat(args) if args.command == "chat" else _generate(args)
    except (ValueError, OSError, ImportError) as e:  # CheckpointError and ConfigError are ValueErrors
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0

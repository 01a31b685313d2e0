"""``python -m llama_jax generate "PROMPT"``: the main job from the command line.

Errors in what the user gave (a missing checkpoint, a broken config, a prompt that is too long) or
in the installation (a missing optional dependency) print one line, ``error: ...``, and exit with
status 2; nothing else is caught.
"""

from __future__ import annotations

import argparse
import sys

from . import __version__


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m llama_jax", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"llama_jax {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    gen = commands.add_parser("generate", help="continue a prompt (or answer it, with --chat)")
    gen.add_argument("prompt")
    gen.add_argument(
        "--model", help="checkpoint directory or hub repo id (default: the bundled SmolLM2-135M-Instruct)"
    )
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.add_argument("--chat", action="store_true", help="apply the tokenizer's chat template")
    gen.add_argument("--temperature", type=float, default=0.0, help="0 (the default) decodes greedily")
    gen.add_argument("--top-k", type=int)
    gen.add_argument("--top-p", type=float)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument(
        "--dtype",
        choices=["auto", "float32", "bfloat16"],
        default="auto",
        help="parameter dtype; auto: float32 on CPU, bfloat16 on an accelerator",
    )
    gen.add_argument(
        "--mesh",
        metavar="batch=B,model=M",
        help="shard the model over B x M devices (tensor parallel over 'model', the batch over 'batch')",
    )
    return parser


def _generate(args) -> None:
    import jax
    import jax.numpy as jnp

    from .checkpoints import default_checkpoint, load_tokenizer, resolve_checkpoint
    from .generate import generate_text
    from .sharding import make_mesh, parse_mesh
    from .weights import from_pretrained

    mesh = make_mesh(**parse_mesh(args.mesh)) if args.mesh else None
    directory = resolve_checkpoint(args.model) if args.model else default_checkpoint()
    dtype = args.dtype
    if dtype == "auto":
        dtype = "float32" if jax.default_backend() == "cpu" else "bfloat16"
    model = from_pretrained(directory, dtype=jnp.dtype(dtype), progress=sys.stderr.isatty(), mesh=mesh)
    tokenizer = load_tokenizer(directory)
    generate_text(
        model,
        tokenizer,
        args.prompt,
        chat=args.chat,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        stream=lambda piece: print(piece, end="", flush=True),
    )
    print()


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    try:
        _generate(args)
    except (ValueError, OSError, ImportError) as e:  # CheckpointError and ConfigError are ValueErrors
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0

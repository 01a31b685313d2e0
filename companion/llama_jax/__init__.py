"""llama_jax: Llama 3.x from Hugging Face checkpoints to JAX/Flax NNX (the book's companion package)."""

__version__ = "0.1.0"  # the one place the version is written (pyproject.toml reads it from here)

from . import convert, lora, sharding, train
from .chat import ChatSession
from .checkpoints import (
    default_checkpoint,
    enable_compilation_cache,
    hub_id,
    load_tokenizer,
    resolve_checkpoint,
    selected_checkpoint,
)
from .config import LLAMA_3_2_1B, ConfigError, LlamaConfig, RopeScaling
from .generate import Sampling, encode_prompts, generate, generate_naive, generate_text, left_pad
from .lora import AdapterError, add_lora, load_adapter, merge_lora, save_adapter
from .model import KVCache, LlamaForCausalLM
from .sharding import FSDP, TENSOR_PARALLEL, make_mesh
from .weights import CheckpointError, from_pretrained, save_pretrained

__all__ = [
    "FSDP",
    "LLAMA_3_2_1B",
    "TENSOR_PARALLEL",
    "AdapterError",
    "ChatSession",
    "CheckpointError",
    "ConfigError",
    "KVCache",
    "LlamaConfig",
    "LlamaForCausalLM",
    "RopeScaling",
    "Sampling",
    "add_lora",
    "convert",
    "default_checkpoint",
    "enable_compilation_cache",
    "encode_prompts",
    "from_pretrained",
    "generate",
    "generate_naive",
    "generate_text",
    "hub_id",
    "left_pad",
    "load_adapter",
    "load_tokenizer",
    "lora",
    "make_mesh",
    "merge_lora",
    "resolve_checkpoint",
    "save_adapter",
    "save_pretrained",
    "selected_checkpoint",
    "sharding",
    "train",
]

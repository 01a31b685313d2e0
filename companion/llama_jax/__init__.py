"""llama_jax: Llama 3.x from Hugging Face checkpoints to JAX/Flax NNX (the book's companion package)."""

__version__ = "0.3.0"  # the one place the version is written (pyproject.toml reads it from here)

from .extras import check_jax_flax

check_jax_flax()  # before flax is imported: an unsupported pair gets one line, not a deep AttributeError

from . import convert, data, lora, sharding, train
from .cache import enable_compilation_cache
from .chat import ChatSession
from .checkpoints import (
    choose_model,
    default_checkpoint,
    from_pretrained,
    hub_id,
    resolve_checkpoint,
    selected_checkpoint,
)
from .config import LLAMA_3_2_1B, CheckpointError, ConfigError, LlamaConfig, RopeScaling
from .generate import DecodeState, Sampling, generate, generate_naive, left_pad
from .lora import AdapterError, add_lora, load_adapter, merge_lora, save_adapter
from .model import KVCache, LlamaForCausalLM
from .quantize import QuantizationError, QuantizedEmbed, QuantizedLinear, quantize
from .sharding import FSDP, TENSOR_PARALLEL, make_mesh
from .text import TextStreamer, encode_prompts, generate_text
from .tokenizer import Tokenizer, load_tokenizer
from .weights import save_pretrained

__all__ = [
    "FSDP",
    "LLAMA_3_2_1B",
    "TENSOR_PARALLEL",
    "AdapterError",
    "ChatSession",
    "CheckpointError",
    "ConfigError",
    "DecodeState",
    "KVCache",
    "LlamaConfig",
    "LlamaForCausalLM",
    "QuantizationError",
    "QuantizedEmbed",
    "QuantizedLinear",
    "RopeScaling",
    "Sampling",
    "TextStreamer",
    "Tokenizer",
    "add_lora",
    "choose_model",
    "convert",
    "data",
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
    "quantize",
    "resolve_checkpoint",
    "save_adapter",
    "save_pretrained",
    "selected_checkpoint",
    "sharding",
    "train",
]

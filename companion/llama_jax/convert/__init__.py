"""Converters from other formats into ``llama_jax``'s model, and back out.

Each converter renames its format's tensors to Hugging Face's names and layouts, reads the config
from where that format keeps it, and hands both to ``llama_jax.weights.model_from_tensors``: the same
strict loader as ``from_pretrained``, so a missing, unexpected or mis-shaped tensor is named in one
clear error whatever the format.

* ``from_keras_hub``: a Keras Hub ``Llama3CausalLM`` or ``Llama3Backbone`` (chapter 8), and
  ``keras_backbone_kwargs``, the arguments that make keras-hub's importer read a checkpoint right;
* ``from_meta`` / ``to_meta``: Meta's original ``consolidated.00.pth`` + ``params.json`` (chapter 9a);
* ``from_gguf``: a llama.cpp GGUF file, quantized or not (chapter 9b), and ``tokenizer_from_gguf``, its tokenizer;
* ``from_torch_state_dict``: a transformers ``LlamaForCausalLM.state_dict()`` in memory (chapter 9a).

Like ``from_pretrained``, each ``from_*`` takes ``mesh=`` and ``rules=`` (``llama_jax.sharding``): every
tensor then goes straight into its shards. ``llama_jax.save_pretrained`` writes any of them back as a
Hugging Face checkpoint.

Heavy libraries (torch, keras) are imported only by the converter that needs them.
"""

from .gguf import from_gguf, tokenizer_from_gguf
from .keras_hub import from_keras_hub, keras_backbone_kwargs
from .meta import from_meta, hf_to_meta_rows, meta_to_hf_rows, to_meta
from .pytorch import from_torch_state_dict

__all__ = [
    "from_gguf",
    "from_keras_hub",
    "from_meta",
    "from_torch_state_dict",
    "hf_to_meta_rows",
    "keras_backbone_kwargs",
    "meta_to_hf_rows",
    "to_meta",
    "tokenizer_from_gguf",
]

"""A random-weight checkpoint of Llama 3.2 1B's shape, to run every chapter on the headline model offline.

Llama 3.2 1B's widths, heads, head_dim, llama3 RoPE scaling (factor 32, original context 8192) and tied
head, with SmolLM2's 49152-token vocabulary and tokenizer (Meta's tokenizer needs the hub), written by
transformers 5's own ``save_pretrained`` (so ``config.json`` has ``rope_parameters``, as every checkpoint
re-saved today has). Weights are transformers' default initialisation: an untrained model, whose logits
are nearly uniform, which is exactly what a chapter's claims must survive.

    python tests/llama_1b_shape.py DIRECTORY [--layers 16]
"""

from __future__ import annotations

import argparse
import os
import shutil

import torch
import transformers

import llama_jax

NOT_TOKENIZER = ("config.json", "generation_config.json")


def write_llama_1b_shape(directory: str | os.PathLike, num_layers: int = 16, seed: int = 0) -> str:
    """Write the checkpoint into ``directory`` (created) and return it."""
    smollm2 = llama_jax.default_checkpoint()
    smollm2_config = llama_jax.LlamaConfig.from_hf(smollm2)
    fields = dict(llama_jax.LLAMA_3_2_1B)
    rope_scaling = fields.pop("rope_scaling")
    fields.update(
        vocab_size=smollm2_config.vocab_size,
        num_hidden_layers=num_layers,
        bos_token_id=smollm2_config.bos_token_id,
        eos_token_id=list(smollm2_config.eos_token_id),
        rope_parameters={**rope_scaling, "rope_theta": fields.pop("rope_theta")},
    )
    for key in ("architectures", "model_type", "torch_dtype"):
        fields.pop(key)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**fields)).eval()
    model.save_pretrained(directory)
    for name in os.listdir(smollm2):
        if name not in NOT_TOKENIZER and not name.startswith("model") and not name.startswith("."):
            shutil.copy(os.path.join(smollm2, name), os.path.join(directory, name))
    return os.fspath(directory)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("directory")
    parser.add_argument("--layers", type=int, default=16, help="decoder layers (Llama 3.2 1B has 16)")
    args = parser.parse_args()
    print(write_llama_1b_shape(args.directory, args.layers))

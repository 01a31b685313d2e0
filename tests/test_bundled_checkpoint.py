"""The bundled model's checkpoint, built without PyTorch, equals the one transformers' GGUF loader
(PyTorch) builds: same logits, same tokenizer, same config.

The reference is built here, in the test, the way ``default_checkpoint()`` used to build it; the
package's build runs in a subprocess where ``import torch`` fails.
"""

import json
import os
import subprocess
import sys
import textwrap

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from conftest import torch_logits, torch_model

import llama_jax

TEXTS = [
    "The capital of France is",
    "Ünïcödé, 日本語のテキスト, emoji 🦙🚀 and a zero-width joiner 👩‍💻.",
    "def f(x):\n    return {'a': [1, 2, 3]}[x] ** 2  # code\n\ttabs\r\nand CRLF",
    "   leading spaces, 12345 digits, 3.14159, <|im_start|> and <|endoftext|> in text",
]
CONVERSATION = [
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And of Italy? 🇮🇹"},
]
WITH_SYSTEM = [{"role": "system", "content": "Answer in one word."}, *CONVERSATION]


def build_with_transformers(gguf_path: str, out_dir: str) -> None:
    """The old route: transformers reads the GGUF (with PyTorch); a plain LlamaConfig without the
    quantization config, so that save_pretrained accepts the model."""
    directory, name = os.path.split(gguf_path)
    tokenizer = transformers.AutoTokenizer.from_pretrained(directory, gguf_file=name)
    model = transformers.LlamaForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32)
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    plain = transformers.LlamaForCausalLM(transformers.LlamaConfig.from_dict(config))
    plain.load_state_dict(model.state_dict())
    plain.generation_config = model.generation_config
    plain.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """(the package's directory, the reference directory)."""
    root = tmp_path_factory.mktemp("bundled")
    script = textwrap.dedent(f"""
        import sys
        sys.modules["torch"] = None  # import torch now fails
        import llama_jax
        print(llama_jax.default_checkpoint({str(root / "cache")!r}))
        assert sys.modules["torch"] is None
    """)
    result = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "TQDM_DISABLE": "1"},
    )
    assert result.returncode == 0, result.stderr
    ours = result.stdout.strip().splitlines()[-1]
    reference = str(root / "reference")
    build_with_transformers(llama_jax.checkpoints.bundled_gguf_path(), reference)
    return ours, reference


def test_same_files(built):
    ours, reference = built
    assert sorted(os.listdir(ours)) == sorted(os.listdir(reference))
    assert not [
        f for f in os.listdir(os.path.dirname(ours)) if f.startswith(".")
    ]  # no temporary directory left


def test_same_logits(built):
    ours, reference = built
    ids = np.asarray(llama_jax.load_tokenizer(reference)(" ".join(TEXTS))["input_ids"])[None]
    ours_jax = np.asarray(
        llama_jax.from_pretrained(ours, dtype=jnp.float32, progress=False)(jnp.asarray(ids))
    )
    reference_jax = np.asarray(
        llama_jax.from_pretrained(reference, dtype=jnp.float32, progress=False)(jnp.asarray(ids))
    )
    jax_diff = float(np.max(np.abs(ours_jax - reference_jax)))
    torch_diff = float(
        np.max(np.abs(torch_logits(torch_model(ours), ids) - torch_logits(torch_model(reference), ids)))
    )
    print(
        f"bundled checkpoint, built without torch vs with transformers ({ids.shape[1]} tokens): max |diff| of the "
        f"logits {jax_diff:.2e} (llama_jax), {torch_diff:.2e} (transformers)"
    )
    assert jax_diff <= 1e-6 and torch_diff <= 1e-6


def test_same_tokenizer(built):
    ours, reference = (transformers.AutoTokenizer.from_pretrained(d) for d in built)
    for text in TEXTS:
        assert ours(text)["input_ids"] == reference(text)["input_ids"], text
        assert ours.decode(ours(text)["input_ids"]) == reference.decode(reference(text)["input_ids"])
    for conversation in (CONVERSATION, WITH_SYSTEM):
        for prompt in (False, True):
            theirs = reference.apply_chat_template(conversation, tokenize=False, add_generation_prompt=prompt)
            assert (
                ours.apply_chat_template(conversation, tokenize=False, add_generation_prompt=prompt) == theirs
            )
    assert ours.chat_template == reference.chat_template
    for name in ("bos_token", "eos_token", "pad_token", "unk_token"):
        assert getattr(ours, name) == getattr(reference, name), name
        assert getattr(ours, f"{name}_id") == getattr(reference, f"{name}_id"), name
    assert ours.all_special_tokens == reference.all_special_tokens
    assert len(ours) == len(reference)


def test_same_config(built):
    ours, reference = built
    assert llama_jax.LlamaConfig.from_hf(ours) == llama_jax.LlamaConfig.from_hf(reference)
    raw = json.load(open(os.path.join(ours, "config.json")))
    assert raw["rope_theta"] == 100000.0 and "rope_scaling" in raw  # the legacy keys, which keras-hub reads
    # transformers reads both to the same config but for the file's name and the unknown-token id
    # (a tokenizer matter, which the tokenizer keeps)
    ignored = {"_name_or_path", "_model_name_or_path", "unk_token_id"}
    theirs, mine = (transformers.AutoConfig.from_pretrained(d).to_dict() for d in (reference, ours))
    assert {k: v for k, v in mine.items() if k not in ignored} == {
        k: v for k, v in theirs.items() if k not in ignored
    }
    # generation: the same special tokens (the reference also spells out transformers' defaults)
    theirs, mine = (transformers.GenerationConfig.from_pretrained(d) for d in (reference, ours))
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        assert getattr(mine, name) == getattr(theirs, name) is not None, name


def test_gguf_without_a_tokenizer(tmp_path):
    import gguf

    writer = gguf.GGUFWriter(str(tmp_path / "bare.gguf"), "llama")
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(
        llama_jax.CheckpointError,
        match=r"bare.gguf: no tokenizer in the file \(tokenizer.ggml.tokens is missing\)",
    ):
        llama_jax.convert.tokenizer_from_gguf(tmp_path / "bare.gguf")
    with pytest.raises(llama_jax.CheckpointError, match="no GGUF file at"):
        llama_jax.convert.tokenizer_from_gguf(tmp_path / "absent.gguf")

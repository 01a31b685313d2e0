"""Loading checkpoints: strictness, sharded files, the hub path (with checkpoints we write), clear errors."""

import json
import os
import shutil

import huggingface_hub
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import llama_jax
from llama_jax import CheckpointError
from llama_jax.weights import expected_tensors, hf_tensors


def copy_checkpoint(src, dst):
    shutil.copytree(src, dst)
    return str(dst)


def rewrite_tensors(directory, change):
    path = os.path.join(directory, "model.safetensors")
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def test_loaded_parameters_are_the_checkpoint_tensors(tiny_checkpoints):
    directory = tiny_checkpoints["untied"]
    model = llama_jax.from_pretrained(directory, dtype=jnp.float32, progress=False)
    stored = load_file(os.path.join(directory, "model.safetensors"))
    ours = hf_tensors(model)
    assert ours.keys() == stored.keys() == expected_tensors(model.config).keys()
    for name, tensor in stored.items():
        np.testing.assert_array_equal(ours[name], tensor, err_msg=name)


def test_sharded_checkpoint_equals_single_file(tiny_checkpoints):
    sharded_dir = tiny_checkpoints["sharded"]
    assert os.path.exists(os.path.join(sharded_dir, "model.safetensors.index.json"))
    assert len([f for f in os.listdir(sharded_dir) if f.endswith(".safetensors")]) > 1
    sharded = llama_jax.from_pretrained(sharded_dir, dtype=jnp.float32, progress=False)
    single = llama_jax.from_pretrained(tiny_checkpoints["untied"], dtype=jnp.float32, progress=False)
    ids = jnp.arange(3, 40)[None]  # the same seed and config: the same weights
    np.testing.assert_array_equal(np.asarray(sharded(ids)), np.asarray(single(ids)))


def test_bfloat16_is_the_default_dtype(tiny_checkpoints):
    model = llama_jax.from_pretrained(tiny_checkpoints["llama32_tied"], progress=False)
    assert model.model.embed_tokens.embedding.get_value().dtype == jnp.bfloat16


def test_missing_tensor_is_named(tiny_checkpoints, tmp_path):
    directory = copy_checkpoint(tiny_checkpoints["untied"], tmp_path / "ckpt")
    rewrite_tensors(directory, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing 1 tensor\(s\): model.layers.1.mlp.up_proj.weight"):
        llama_jax.from_pretrained(directory, progress=False)


def test_unexpected_and_misshaped_tensors_are_named(tiny_checkpoints, tmp_path):
    directory = copy_checkpoint(tiny_checkpoints["untied"], tmp_path / "ckpt")

    def change(tensors):
        tensors["model.layers.0.self_attn.q_proj.bias"] = np.zeros(64, np.float32)
        tensors["model.norm.weight"] = np.ones(65, np.float32)

    rewrite_tensors(directory, change)
    with pytest.raises(CheckpointError) as error:
        llama_jax.from_pretrained(directory, progress=False)
    message = str(error.value)
    assert "unexpected 1 tensor(s): model.layers.0.self_attn.q_proj.bias" in message
    assert "model.norm.weight (65,) (config implies (64,))" in message
    assert "\n" not in message


def test_config_that_disagrees_with_the_weights(tiny_checkpoints, tmp_path):
    directory = copy_checkpoint(tiny_checkpoints["untied"], tmp_path / "ckpt")
    config_path = os.path.join(directory, "config.json")
    config = json.load(open(config_path))
    config["intermediate_size"] = 14336  # the old tutorial's mistake: the 8B's MLP size
    json.dump(config, open(config_path, "w"))
    with pytest.raises(
        CheckpointError, match=r"mlp.down_proj.weight \(64, 128\) \(config implies \(64, 14336\)\)"
    ):
        llama_jax.from_pretrained(directory, progress=False)


def test_tied_checkpoint_may_carry_a_head_copy(tiny_checkpoints, tmp_path):
    directory = copy_checkpoint(tiny_checkpoints["llama32_tied"], tmp_path / "ckpt")
    rewrite_tensors(directory, lambda t: t.update({"lm_head.weight": t["model.embed_tokens.weight"]}))
    llama_jax.from_pretrained(directory, progress=False)


def test_bad_paths(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint directory at /nonexistent"):
        llama_jax.from_pretrained("/nonexistent")
    (tmp_path / "model.gguf").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="is a file"):
        llama_jax.from_pretrained(tmp_path / "model.gguf")
    with pytest.raises(llama_jax.ConfigError, match="no config.json"):
        llama_jax.from_pretrained(tmp_path)


def test_no_weight_files(tiny_checkpoints, tmp_path):
    (tmp_path / "config.json").write_text(
        open(os.path.join(tiny_checkpoints["untied"], "config.json")).read()
    )
    with pytest.raises(CheckpointError, match=r"no \*.safetensors weight files"):
        llama_jax.from_pretrained(tmp_path)


def test_corrupt_safetensors_file(tiny_checkpoints, tmp_path):
    directory = copy_checkpoint(tiny_checkpoints["untied"], tmp_path / "ckpt")
    with open(os.path.join(directory, "model.safetensors"), "r+b") as f:
        f.write(b"\xff" * 16)
    with pytest.raises(CheckpointError, match="cannot read .*model.safetensors"):
        llama_jax.from_pretrained(directory)


def test_hub_repo_id_goes_through_snapshot_download(tiny_checkpoints, monkeypatch):
    calls = []

    def fake_snapshot_download(repo_id, **kwargs):
        calls.append((repo_id, kwargs))
        return tiny_checkpoints["llama32_tied"]

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    model = llama_jax.from_pretrained("meta-llama/Llama-3.2-1B", dtype=jnp.float32, progress=False)
    assert calls[0][0] == "meta-llama/Llama-3.2-1B"
    assert "*.safetensors" in calls[0][1]["allow_patterns"]
    assert model.config.num_hidden_layers == 2


@pytest.mark.parametrize(
    "error, message",
    [
        (
            huggingface_hub.errors.LocalEntryNotFoundError("Connection error"),
            "could not reach the Hugging Face Hub.*default_checkpoint",
        ),
        (OSError("Name or service not known"), "could not reach the Hugging Face Hub"),
    ],
)
def test_unreachable_hub_points_to_the_default_model(monkeypatch, error, message):
    def fail(repo_id, **kwargs):
        raise error

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fail)
    with pytest.raises(CheckpointError, match=message):
        llama_jax.from_pretrained("meta-llama/Llama-3.2-1B")


def test_default_checkpoint_is_built_once_and_reused(smollm2_dir):
    assert llama_jax.default_checkpoint() == smollm2_dir
    files = set(os.listdir(smollm2_dir))
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= files
    assert not [
        f for f in os.listdir(os.path.dirname(smollm2_dir)) if f.startswith(".SmolLM2")
    ]  # no leftovers


def test_selected_checkpoint_follows_the_environment(tiny_checkpoints, smollm2_dir, monkeypatch):
    monkeypatch.delenv("LLAMA_JAX_MODEL", raising=False)
    assert llama_jax.selected_checkpoint() == smollm2_dir
    monkeypatch.setenv("LLAMA_JAX_MODEL", tiny_checkpoints["untied"])
    assert llama_jax.selected_checkpoint() == tiny_checkpoints["untied"]


TEXTS = [
    "The capital of France is",
    "  leading spaces, trailing spaces  ",
    "Ünïcödé — ça va? 日本語のテキスト 🙂",
    "def fibonacci(n):\n\treturn n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)\n",
    "<|im_start|>user\nHi<|im_end|>\n",
    "don't , isn't . they're ! ",
]
CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [
        {"role": "system", "content": "You answer briefly."},
        {"role": "user", "content": "Hi!"},
        {"role": "assistant", "content": "Hello. How can I help?"},
        {"role": "user", "content": "Name a prime number."},
    ],
]


def test_lean_tokenizer_equals_autotokenizer(smollm2_dir):
    """load_tokenizer skips transformers' import: same ids, decoding, special tokens and chat template."""
    import transformers

    ours = llama_jax.load_tokenizer(smollm2_dir)
    theirs = transformers.AutoTokenizer.from_pretrained(smollm2_dir)
    assert isinstance(ours, llama_jax.Tokenizer)
    for name in ("bos_token", "eos_token", "pad_token", "bos_token_id", "eos_token_id", "pad_token_id"):
        assert getattr(ours, name) == getattr(theirs, name), name
    assert ours.chat_template == theirs.chat_template and len(ours) == len(theirs)
    for text in TEXTS:
        for special in (True, False):
            assert ours(text, add_special_tokens=special) == dict(theirs(text, add_special_tokens=special))
        ids = theirs(text)["input_ids"]
        for skip in (True, False):
            assert ours.decode(ids, skip_special_tokens=skip) == theirs.decode(ids, skip_special_tokens=skip)
    np.testing.assert_array_equal(
        ours(TEXTS[0], return_tensors="np")["input_ids"], theirs(TEXTS[0], return_tensors="np")["input_ids"]
    )
    for conversation in CONVERSATIONS:
        for prompt in (True, False):
            kwargs = dict(add_generation_prompt=prompt)
            assert ours.apply_chat_template(conversation, tokenize=False, **kwargs) == (
                theirs.apply_chat_template(conversation, tokenize=False, **kwargs)
            )
            assert ours.apply_chat_template(conversation, **kwargs) == dict(
                theirs.apply_chat_template(conversation, **kwargs)
            )
    # anything else is transformers' own tokenizer for the same files
    assert ours.convert_ids_to_tokens([1, 2]) == theirs.convert_ids_to_tokens([1, 2])

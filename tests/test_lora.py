"""LoRA adapters (llama_jax.lora) against peft on the same weights, float32: the forward pass, merging,
and adapters saved by one and loaded by the other. The figures are printed (``pytest -s``)."""

from __future__ import annotations

import json
import os
import shutil
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
from conftest import torch_logits, torch_model
from flax import nnx

import llama_jax
from llama_jax import AdapterError, CheckpointError, ConfigError

IDS = np.random.RandomState(0).randint(3, 256, (2, 48))
TOL = 1e-4
RANK, ALPHA = 4, 8.0  # scaling 2: a wrong scaling shows


def max_diff(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32))))


def ours(model, ids=IDS) -> np.ndarray:
    return np.asarray(model(jnp.asarray(ids)))


def peft_model(directory, seed=0):
    """transformers' model with a peft LoRA adapter on every projection, B not zero (so it does something)."""
    torch.manual_seed(seed)
    config = peft.LoraConfig(
        r=RANK,
        lora_alpha=ALPHA,
        target_modules=list(llama_jax.lora.TARGETS),
        lora_dropout=0.0,
        init_lora_weights=False,
    )
    return peft.get_peft_model(torch_model(directory), config).eval()


@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoints):
    return tiny_checkpoints["llama32_tied"]


@pytest.fixture(scope="module")
def peft_adapter(checkpoint, tmp_path_factory):
    """(peft model, its logits on IDS, the directory peft saved its adapter to)."""
    model = peft_model(checkpoint)
    directory = tmp_path_factory.mktemp("peft") / "adapter"
    model.save_pretrained(directory)
    return model, torch_logits(model, IDS), str(directory)


def test_a_fresh_adapter_changes_nothing(checkpoint):
    base = llama_jax.from_pretrained(checkpoint, dtype=jnp.float32, progress=False)
    expected = ours(base)
    model = llama_jax.add_lora(base, rank=RANK, alpha=ALPHA)
    assert isinstance(model.model.layers[0].self_attn.q_proj, llama_jax.lora.LoRALinear)
    np.testing.assert_array_equal(ours(model), expected)  # lora_b starts at zero
    with pytest.raises(CheckpointError, match="the model has LoRA adapters"):
        llama_jax.weights.hf_tensors(model)


def test_trainable_parameters_equal_peft(checkpoint, peft_adapter):
    model = llama_jax.add_lora(
        llama_jax.from_pretrained(checkpoint, dtype=jnp.float32, progress=False), rank=RANK
    )
    trainable, _ = peft_adapter[0].get_nb_trainable_parameters()
    print(
        f"trainable parameters: llama_jax {llama_jax.lora.trainable_parameters(model):,}, peft {trainable:,}"
    )
    assert llama_jax.lora.trainable_parameters(model) == trainable


def test_a_peft_adapter_runs_in_llama_jax(checkpoint, peft_adapter):
    _, reference, directory = peft_adapter
    model = llama_jax.load_adapter(
        llama_jax.from_pretrained(checkpoint, dtype=jnp.float32, progress=False), directory
    )
    base = torch_logits(torch_model(checkpoint), IDS)
    diff = max_diff(ours(model), reference)
    print(
        f"peft adapter: llama_jax vs peft max |diff| = {diff:.2e} (the adapter moves the logits by "
        f"{max_diff(reference, base):.2f})"
    )
    assert diff <= TOL and max_diff(reference, base) > 100 * TOL


def test_merged_model_equals_peft_merge_and_unload(checkpoint, peft_adapter, tmp_path):
    peft_merged = peft_model(checkpoint).merge_and_unload()  # the same adapter values (same seed)
    reference = torch_logits(peft_merged, IDS)
    model = llama_jax.load_adapter(
        llama_jax.from_pretrained(checkpoint, dtype=jnp.float32, progress=False), peft_adapter[2]
    )
    merged = llama_jax.merge_lora(model)
    assert not isinstance(merged.model.layers[0].self_attn.q_proj, llama_jax.lora.LoRALinear)
    diff = max_diff(ours(merged), reference)
    print(
        f"merged: llama_jax vs peft merge_and_unload max |diff| = {diff:.2e}; "
        f"merged vs unmerged llama_jax {max_diff(ours(merged), ours(model)):.2e}"
    )
    assert diff <= TOL and max_diff(ours(merged), ours(model)) <= TOL
    saved = llama_jax.save_pretrained(merged, tmp_path / "merged")  # a plain checkpoint again
    assert max_diff(torch_logits(torch_model(saved), IDS), reference) <= TOL


def test_llama_jax_adapter_loads_in_peft(checkpoint, tmp_path):
    model = llama_jax.add_lora(
        llama_jax.from_pretrained(checkpoint, dtype=jnp.float32, progress=False),
        rank=RANK,
        alpha=ALPHA,
        targets=("q_proj", "v_proj", "down_proj"),
        seed=3,
    )
    rng = np.random.default_rng(0)
    for _, module in llama_jax.lora._adapters(model):  # as if trained: B no longer zero
        module.lora_b.set_value(
            jnp.asarray(rng.normal(0, 0.05, module.lora_b.get_value().shape), jnp.float32)
        )
    with pytest.warns(UserWarning, match="local directory, so the adapter loads only on this machine"):
        directory = llama_jax.save_adapter(model, tmp_path / "adapter", base_model_name_or_path=checkpoint)
    config = json.load(open(os.path.join(directory, "adapter_config.json")))
    assert config["target_modules"] == ["down_proj", "q_proj", "v_proj"] and config["r"] == RANK
    loaded = peft.PeftModel.from_pretrained(torch_model(checkpoint), directory).eval()
    diff = max_diff(ours(model), torch_logits(loaded, IDS))
    print(f"llama_jax adapter in peft: max |diff| = {diff:.2e}")
    assert diff <= TOL
    again = llama_jax.load_adapter(
        llama_jax.from_pretrained(checkpoint, dtype=jnp.float32, progress=False), directory
    )
    np.testing.assert_array_equal(ours(again), ours(model))


def test_adapter_names_its_base_model_by_hub_id(checkpoint, tmp_path):
    """adapter_config.json's base_model_name_or_path, what peft's AutoPeftModel and the Hub load, is the
    hub id given; a local directory or none is written as given, with a warning."""
    model = llama_jax.add_lora(
        llama_jax.from_pretrained(checkpoint, dtype=jnp.float32, progress=False),
        rank=RANK,
        targets=("q_proj",),
    )
    hub = "meta-llama/Llama-3.2-1B"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a hub id is what is asked for: no warning
        directory = llama_jax.save_adapter(model, tmp_path / "hub", base_model_name_or_path=hub)
    assert peft.PeftConfig.from_pretrained(directory).base_model_name_or_path == hub
    with pytest.warns(UserWarning, match="local directory, so the adapter loads only on this machine"):
        local = llama_jax.save_adapter(model, tmp_path / "local", base_model_name_or_path=checkpoint)
    assert peft.PeftConfig.from_pretrained(local).base_model_name_or_path == str(checkpoint)
    with pytest.warns(UserWarning, match="no base_model_name_or_path"):
        none = llama_jax.save_adapter(model, tmp_path / "none")
    assert json.load(open(os.path.join(none, "adapter_config.json")))["base_model_name_or_path"] is None


def test_hub_id(tmp_path):
    """llama_jax.hub_id: a repo id as given, a hub cache snapshot's id, the bundled model's source."""
    assert llama_jax.hub_id("meta-llama/Llama-3.2-1B") == "meta-llama/Llama-3.2-1B"
    assert llama_jax.hub_id(llama_jax.default_checkpoint()) == "HuggingFaceTB/SmolLM2-135M-Instruct"
    snapshot = tmp_path / "hub" / "models--meta-llama--Llama-3.2-1B" / "snapshots" / "0123abc"
    snapshot.mkdir(parents=True)
    assert llama_jax.hub_id(snapshot) == "meta-llama/Llama-3.2-1B"
    assert llama_jax.hub_id(tmp_path) is None  # a directory of one's own: no id
    assert llama_jax.hub_id("not/a/repo") is None


def test_errors_are_one_line(checkpoint, peft_adapter, tiny_checkpoints, tmp_path):
    base = llama_jax.from_pretrained(checkpoint, dtype=jnp.float32, progress=False)
    with pytest.raises(ConfigError, match=r"LoRA rank must be >= 1, got 0"):
        llama_jax.add_lora(base, rank=0)
    with pytest.raises(ConfigError, match=r"LoRA targets \['qkv_proj'\] match no layer"):
        llama_jax.add_lora(base, targets=("qkv_proj",))
    with pytest.raises(AdapterError, match="the model has no LoRA adapters"):
        llama_jax.save_adapter(base, tmp_path / "none", base_model_name_or_path="meta-llama/Llama-3.2-1B")
    with pytest.raises(AdapterError, match="adapter_config.json is missing"):
        llama_jax.load_adapter(base, tmp_path)
    # an adapter for another base model: the shapes do not fit, and the error names the tensor
    other = llama_jax.from_pretrained(tiny_checkpoints["head_dim_32"], dtype=jnp.float32, progress=False)
    with pytest.raises(
        AdapterError, match=r"self_attn\.\w+_proj\.lora_[AB]\.weight has shape .*another base model"
    ):
        llama_jax.load_adapter(other, peft_adapter[2])
    dora = shutil.copytree(peft_adapter[2], tmp_path / "dora")
    config = json.load(open(dora / "adapter_config.json"))
    json.dump({**config, "use_dora": True}, open(dora / "adapter_config.json", "w"))
    with pytest.raises(AdapterError, match="unsupported use_dora=True"):
        llama_jax.load_adapter(llama_jax.from_pretrained(checkpoint, dtype=jnp.float32, progress=False), dora)


# ---------------------------------------------------------------------------------------------------
# Training against peft: the same adapter values, the same batch, the same AdamW


def training_batch():
    """Two rows, the second left-padded; the loss counts the last 20 tokens of each (the "answer")."""
    rng = np.random.default_rng(1)
    ids, mask = llama_jax.left_pad([rng.integers(3, 256, 40).tolist(), rng.integers(3, 256, 31).tolist()])
    loss_mask = np.zeros_like(mask)
    loss_mask[:, -20:] = 1
    return ids, mask, loss_mask


def torch_loss(model, ids, mask, loss_mask):
    """transformers' own loss from labels (-100 where not a target), positions counted from each row's first
    real token, as llama_jax does for left padding."""
    labels = np.where(loss_mask * mask == 1, ids, -100)
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    out = model(
        input_ids=torch.as_tensor(ids, dtype=torch.long),
        attention_mask=torch.as_tensor(mask),
        position_ids=torch.as_tensor(positions),
        labels=torch.as_tensor(labels, dtype=torch.long),
    )
    return out.loss


def adapter_values(model) -> dict[str, np.ndarray]:
    return {
        f"{name}.lora_{part}": np.asarray(getattr(m, f"lora_{part.lower()}").get_value()).T
        for name, m in llama_jax.lora._adapters(model)
        for part in "AB"
    }


def peft_values(model, grads=False) -> dict[str, np.ndarray]:
    out = {}
    for name, param in model.named_parameters():
        if "lora_" in name:
            key = name.removeprefix("base_model.model.").replace(".default.weight", "")
            out[key] = (param.grad if grads else param).detach().numpy().copy()
    return out


def test_lora_update_gradients_equal_autodiff():
    """lora_update writes its backward pass out (to choose the order of the adapters' products); its
    gradients for x, a and b equal autodiff's on the plain expression, with leading axes summed over."""
    keys = jax.random.split(jax.random.key(0), 4)
    x = jax.random.normal(keys[0], (3, 5, 7))
    a, b = jax.random.normal(keys[1], (7, 2)), jax.random.normal(keys[2], (2, 4))
    weight = jax.random.normal(keys[3], (3, 5, 4))  # a cotangent that is not all ones

    def loss(update):
        return lambda x, a, b: jnp.sum(update(x, a, b) * weight)

    plain = jax.grad(loss(lambda x, a, b: (x @ a @ b) * 2.5), argnums=(0, 1, 2))(x, a, b)
    written = jax.grad(loss(lambda x, a, b: llama_jax.lora.lora_update(x, a, b, 2.5)), argnums=(0, 1, 2))(
        x, a, b
    )
    diffs = [max_diff(p, w) / float(np.abs(p).max()) for p, w in zip(plain, written, strict=True)]
    print(f"lora_update gradients (x, a, b) vs autodiff: relative {', '.join(f'{d:.1e}' for d in diffs)}")
    assert all(w.shape == p.shape for p, w in zip(plain, written, strict=True))
    assert max(diffs) <= 1e-6


def test_loss_gradients_and_adamw_steps_equal_peft(checkpoint, peft_adapter):
    ids, mask, loss_mask = training_batch()
    reference = peft_model(checkpoint)  # the same adapter values as peft_adapter's (same seed)
    reference.train()
    model = llama_jax.load_adapter(
        llama_jax.from_pretrained(checkpoint, dtype=jnp.float32, progress=False), peft_adapter[2]
    )

    loss = torch_loss(reference, ids, mask, loss_mask)
    loss.backward()
    ours_loss, grads = nnx.value_and_grad(
        llama_jax.train.causal_lm_loss, argnums=nnx.DiffState(0, nnx.LoRAParam)
    )(model, jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(loss_mask))
    loss_rel = abs(float(ours_loss) - loss.item()) / loss.item()
    our_grads = {}
    for path, value in nnx.to_flat_state(grads):
        module = ".".join(str(step) for step in path[:-1])
        our_grads[f"{module}.lora_{path[-1][-1].upper()}"] = np.asarray(value.get_value()).T
    their_grads = peft_values(reference, grads=True)
    assert our_grads.keys() == their_grads.keys()
    grad_rel = max(
        np.abs(our_grads[k] - their_grads[k]).max() / np.abs(their_grads[k]).max() for k in our_grads
    )
    print(
        f"loss {float(ours_loss):.6f} vs peft {loss.item():.6f} (relative {loss_rel:.1e}); "
        f"adapter gradients: largest relative difference {grad_rel:.1e}"
    )
    assert loss_rel <= 1e-5 and grad_rel <= 1e-4

    # 10 AdamW steps each (weight decay on, no clipping, constant learning rate)
    torch_opt = torch.optim.AdamW(
        [p for p in reference.parameters() if p.requires_grad],
        lr=1e-3,
        betas=(0.9, 0.999),
        eps=1e-8,
        weight_decay=0.01,
    )
    optimizer = llama_jax.train.lora_optimizer(model, 1e-3, weight_decay=0.01, clip_norm=None)
    for step in range(10):
        if step:  # step 0's gradients are already there
            torch_opt.zero_grad()
            torch_loss(reference, ids, mask, loss_mask).backward()
        torch_opt.step()
        llama_jax.train.train_step(model, optimizer, ids, mask, loss_mask)
    ours_after, theirs_after = adapter_values(model), peft_values(reference)
    moved = max(np.abs(theirs_after[k] - v).max() for k, v in peft_values(peft_model(checkpoint)).items())
    diff = max(np.abs(ours_after[k] - theirs_after[k]).max() for k in ours_after)
    print(f"after 10 AdamW steps: adapters max |diff| {diff:.1e} (the steps moved them by up to {moved:.1e})")
    assert diff <= 1e-3 and moved > 10 * diff
    # the base weights did not move
    base = llama_jax.from_pretrained(checkpoint, dtype=jnp.float32, progress=False)
    np.testing.assert_array_equal(
        model.model.layers[0].self_attn.q_proj.kernel.get_value(),
        base.model.layers[0].self_attn.q_proj.kernel.get_value(),
    )


def test_logits_only_at_the_targets_give_the_same_loss_and_gradients(checkpoint, peft_adapter):
    """train_step computes the head and the softmax only at each row's target positions, gathered (as many
    per row as the batch's most, rounded up to 32): with answers of 20 and 7 tokens in rows of 100 that is
    32 per row, and the loss still equals transformers' and the gradients those of the whole-sequence loss."""
    rng = np.random.default_rng(2)
    ids, mask = llama_jax.left_pad([rng.integers(3, 256, 100).tolist(), rng.integers(3, 256, 90).tolist()])
    loss_mask = np.zeros_like(mask)
    loss_mask[0, -20:] = 1
    loss_mask[1, 50:57] = 1  # an answer in the middle: positions after it are not targets either
    per_row = llama_jax.train.targets_per_row_for(loss_mask, mask)
    assert per_row == 32
    assert llama_jax.train.targets_per_row_for(np.ones_like(mask), mask) == 99  # never more than T - 1
    model = llama_jax.load_adapter(
        llama_jax.from_pretrained(checkpoint, dtype=jnp.float32, progress=False), peft_adapter[2]
    )
    grad_fn = nnx.value_and_grad(llama_jax.train.causal_lm_loss, argnums=nnx.DiffState(0, nnx.LoRAParam))
    batch = [jnp.asarray(a) for a in (ids, mask, loss_mask)]
    (whole, whole_grads), (cut, cut_grads) = (grad_fn(model, *batch, k) for k in (None, per_row))
    expected = torch_loss(peft_model(checkpoint).train(), ids, mask, loss_mask).item()
    pairs = zip(jax.tree.leaves(whole_grads), jax.tree.leaves(cut_grads), strict=True)
    grad_diff = max(float(jnp.abs(a - b).max()) for a, b in pairs)
    print(
        f"loss at {per_row} positions per row: {float(cut):.6f}, every position: {float(whole):.6f}, "
        f"transformers {expected:.6f}"
    )
    print(f"adapter gradients max |diff| {grad_diff:.1e}")
    assert abs(float(cut) - expected) <= 1e-5 * expected and abs(float(cut) - float(whole)) <= 1e-6 * expected
    assert grad_diff <= 1e-6


def test_training_lowers_the_loss_and_refuses_bad_batches(checkpoint):
    model = llama_jax.add_lora(
        llama_jax.from_pretrained(checkpoint, dtype=jnp.float32, progress=False), rank=8
    )
    ids, mask, loss_mask = training_batch()
    schedule = llama_jax.train.warmup_cosine(3e-3, steps=30, warmup=5)
    assert float(schedule(0)) == 0 and float(schedule(5)) == pytest.approx(3e-3) and float(schedule(30)) == 0
    optimizer = llama_jax.train.lora_optimizer(model, schedule)
    before = llama_jax.train.evaluate(model, ids, mask, loss_mask)
    losses = llama_jax.train.fit(
        model, optimizer, iter(lambda: (ids, mask, loss_mask), None), steps=30, progress=False
    )
    after = llama_jax.train.evaluate(model, ids, mask, loss_mask)
    print(f"30 steps on one batch: loss {before:.3f} -> {after:.3f}")
    assert len(losses) == 30 and losses[0] == pytest.approx(before, rel=1e-5) and after < 0.5 * before
    with pytest.raises(ValueError, match="the batch has no target tokens"):
        llama_jax.train.train_step(model, optimizer, ids, mask, np.zeros_like(loss_mask))
    with pytest.raises(ValueError, match="no LoRA adapters to train"):
        llama_jax.train.lora_optimizer(
            llama_jax.from_pretrained(checkpoint, dtype=jnp.float32, progress=False)
        )


def test_bfloat16_base_with_float32_adapters_trains(checkpoint):
    """The GPU set-up: frozen bfloat16 weights, float32 adapters and optimizer state."""
    model = llama_jax.add_lora(
        llama_jax.from_pretrained(checkpoint, dtype=jnp.bfloat16, progress=False), rank=8
    )
    assert model.model.layers[0].self_attn.q_proj.kernel.get_value().dtype == jnp.bfloat16
    assert model.model.layers[0].self_attn.q_proj.lora_a.get_value().dtype == jnp.float32
    ids, mask, loss_mask = training_batch()
    optimizer = llama_jax.train.lora_optimizer(model, 3e-3)
    before = llama_jax.train.evaluate(model, ids, mask, loss_mask)
    llama_jax.train.fit(
        model, optimizer, iter(lambda: (ids, mask, loss_mask), None), steps=10, progress=False
    )
    after = llama_jax.train.evaluate(model, ids, mask, loss_mask)
    print(f"bfloat16 base, 10 steps: loss {before:.3f} -> {after:.3f}")
    assert np.isfinite(after) and after < 0.8 * before
    assert model.model.layers[0].self_attn.q_proj.lora_b.get_value().dtype == jnp.float32

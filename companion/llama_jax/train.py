"""Fine-tuning: the loss, the optimizer and a jitted train step that updates only the LoRA adapters.

The loss is next-token cross-entropy in float32, averaged over the tokens that ``loss_mask`` marks as
targets (the answer, not the prompt), exactly what transformers computes from ``labels`` with -100 on
the prompt. Batches may be left- or right-padded; ``attention_mask`` says which tokens are real.

Only ``nnx.LoRAParam`` parameters get gradients and optimizer state (``nnx.DiffState(0, nnx.LoRAParam)``,
``nnx.Optimizer(..., wrt=nnx.LoRAParam)``): the base weights stay frozen, in whatever dtype they were
loaded (bfloat16 on a GPU), while the adapters train in float32. On a sharded model (chapter 10) the batch
is split over the mesh's ``"batch"`` axis and XLA does the rest.
"""

from __future__ import annotations

from collections.abc import Iterable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm.auto import tqdm

from .model import LlamaForCausalLM
from .sharding import mesh_of, split_rows


def causal_lm_loss(model: LlamaForCausalLM, input_ids, attention_mask, loss_mask) -> jax.Array:
    """Mean cross-entropy of the next token over the positions whose *target* ``loss_mask`` marks.

    input_ids, attention_mask, loss_mask: [B, T]. Token t+1 is the target of position t; it counts when
    ``loss_mask[:, t + 1]`` is 1 (and it is a real token)."""
    logits = model(input_ids, attention_mask)[:, :-1]  # [B, T-1, V], float32
    targets = input_ids[:, 1:]
    weights = (loss_mask[:, 1:] * attention_mask[:, 1:]).astype(jnp.float32)
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    picked = jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]  # [B, T-1]
    return -(picked * weights).sum() / jnp.maximum(weights.sum(), 1.0)


def warmup_cosine(learning_rate: float, steps: int, warmup: int = 0) -> optax.Schedule:
    """Linear warmup from 0 over ``warmup`` steps, then cosine decay to 0 at ``steps``."""
    if warmup >= steps:
        raise ValueError(f"warmup ({warmup}) must be shorter than the run ({steps} steps)")
    return optax.warmup_cosine_decay_schedule(0.0, learning_rate, warmup, steps, end_value=0.0)


def lora_optimizer(
    model: LlamaForCausalLM,
    learning_rate: float | optax.Schedule = 1e-4,
    *,
    weight_decay: float = 0.0,
    clip_norm: float | None = 1.0,
) -> nnx.Optimizer:
    """AdamW on the adapters only (after gradient clipping to ``clip_norm``, if given)."""
    if not nnx.to_flat_state(nnx.state(model, nnx.LoRAParam)):
        raise ValueError("the model has no LoRA adapters to train: llama_jax.add_lora(model, ...) first")
    adamw = optax.adamw(learning_rate, b1=0.9, b2=0.999, eps=1e-8, weight_decay=weight_decay)
    tx = adamw if clip_norm is None else optax.chain(optax.clip_by_global_norm(clip_norm), adamw)
    return nnx.Optimizer(model, tx, wrt=nnx.LoRAParam)


@nnx.jit
def _train_step(model, optimizer, input_ids, attention_mask, loss_mask):
    grad_fn = nnx.value_and_grad(causal_lm_loss, argnums=nnx.DiffState(0, nnx.LoRAParam))
    loss, grads = grad_fn(model, input_ids, attention_mask, loss_mask)
    optimizer.update(model, grads)
    return loss


def _on_mesh(model, *arrays):
    """The batch arrays, split over the model's "batch" mesh axis when the model is sharded."""
    mesh = mesh_of(nnx.state(model))
    if mesh is None:
        return [jnp.asarray(a) for a in arrays]
    rows = mesh.shape["batch"]
    if arrays[0].shape[0] % rows:
        raise ValueError(
            f"batch of {arrays[0].shape[0]} is not a multiple of the mesh's 'batch' axis ({rows})"
        )
    return split_rows(mesh, *arrays)


def _check_batch(input_ids, attention_mask, loss_mask):
    ids, mask, targets = (np.asarray(a) for a in (input_ids, attention_mask, loss_mask))
    if not ids.shape == mask.shape == targets.shape or ids.ndim != 2:
        raise ValueError(
            f"input_ids {ids.shape}, attention_mask {mask.shape} and loss_mask {targets.shape} "
            "must be the same [batch, time] shape"
        )
    if not (targets[:, 1:] * mask[:, 1:]).any():
        raise ValueError("the batch has no target tokens: loss_mask (after the first position) is all zeros")
    return ids.astype(np.int32), mask.astype(np.int32), targets.astype(np.int32)


def train_step(
    model: LlamaForCausalLM, optimizer: nnx.Optimizer, input_ids, attention_mask, loss_mask
) -> float:
    """One optimizer step on one batch (compiled once per batch shape); returns the batch's loss."""
    batch = _on_mesh(model, *_check_batch(input_ids, attention_mask, loss_mask))
    return float(_train_step(model, optimizer, *batch))


@nnx.jit
def _eval_loss(model, input_ids, attention_mask, loss_mask):
    return causal_lm_loss(model, input_ids, attention_mask, loss_mask)


def evaluate(model: LlamaForCausalLM, input_ids, attention_mask, loss_mask) -> float:
    """The loss on a batch, without training."""
    return float(_eval_loss(model, *_on_mesh(model, *_check_batch(input_ids, attention_mask, loss_mask))))


def fit(
    model: LlamaForCausalLM, optimizer: nnx.Optimizer, batches: Iterable, *, steps: int, progress: bool = True
) -> list[float]:
    """Train for ``steps`` batches from ``batches`` (tuples of input_ids, attention_mask, loss_mask); a progress
    bar shows the running loss. Returns the loss of every step."""
    losses = []
    bar = tqdm(total=steps, desc="training", disable=not progress, leave=False)
    for _, batch in zip(range(steps), batches, strict=False):
        losses.append(train_step(model, optimizer, *batch))
        bar.update()
        bar.set_postfix(loss=f"{np.mean(losses[-10:]):.3f}")
    bar.close()
    return losses

"""Fine-tuning: the loss, the optimizer, a jitted train step that updates only the LoRA adapters, the
training state on disk, and ``finetune``, a whole run (what ``llama-jax finetune`` calls).

The loss is next-token cross-entropy in float32, averaged over the tokens that ``loss_mask`` marks as
targets (the answer, not the prompt), exactly what transformers computes from ``labels`` with -100 on
the prompt. Batches may be left- or right-padded; ``attention_mask`` says which tokens are real.

Only ``nnx.LoRAParam`` parameters get gradients and optimizer state (``nnx.DiffState(0, nnx.LoRAParam)``,
``nnx.Optimizer(..., wrt=nnx.LoRAParam)``): the base weights stay frozen, in whatever dtype they were
loaded (bfloat16 on a GPU), while the adapters train in float32. On a sharded model (chapter 10) each
process passes its own rows of the batch, which go to its devices along the mesh's ``"batch"`` axis;
the adapters and AdamW's state are replicated (rank-r matrices are small: each device holds them whole
and XLA all-reduces their gradients over ``"batch"``, as PyTorch's DDP does), and XLA does the rest.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import sys
import time
from collections.abc import Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm.auto import tqdm

from .cache import hub_id
from .data import Dataset, batch_at, data_files, eval_batches, load_dataset
from .lora import TARGETS, add_lora, save_adapter
from .model import LlamaForCausalLM
from .sharding import host_value, mesh_of


def loss_sums(
    model: LlamaForCausalLM, input_ids, attention_mask, loss_mask, targets_per_row: int | None = None
) -> tuple[jax.Array, jax.Array]:
    """(summed cross-entropy of the next token over the target positions, how many there are).

    input_ids, attention_mask, loss_mask: [B, T]. Token t+1 is the target of position t; it counts when
    ``loss_mask[:, t + 1]`` is 1 (and it is a real token). ``targets_per_row`` (static): no row has more
    target positions than this, so the head and the softmax over the vocabulary run only on each row's
    first ``targets_per_row`` target positions, gathered (a prompt needs hidden states, not logits);
    ``train_step`` passes the batch's most, rounded up to a multiple of 32. None: every position."""
    hidden, _ = model.model(input_ids, attention_mask)  # [B, T, H]
    hidden, targets = hidden[:, :-1], input_ids[:, 1:]  # [B, T-1, H], [B, T-1]
    weights = (loss_mask[:, 1:] * attention_mask[:, 1:]).astype(jnp.float32)
    if targets_per_row is not None:  # each row's target positions first, in order, then the others
        positions = jnp.argsort(weights == 0, axis=1, stable=True)[:, :targets_per_row]  # [B, K]
        hidden = jnp.take_along_axis(hidden, positions[..., None], axis=1)  # [B, K, H]
        targets = jnp.take_along_axis(targets, positions, axis=1)
        weights = jnp.take_along_axis(weights, positions, axis=1)  # 0 where a row has fewer than K
    logits = model.logits(hidden)  # [B, K or T-1, V], float32
    # -log softmax(logits)[target] = logsumexp(logits) - logits[target]: no [B, T, V] log-probabilities
    picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return ((jax.nn.logsumexp(logits, axis=-1) - picked) * weights).sum(), weights.sum()


def causal_lm_loss(
    model: LlamaForCausalLM, input_ids, attention_mask, loss_mask, targets_per_row: int | None = None
) -> jax.Array:
    """Mean cross-entropy of the next token over the positions whose *target* ``loss_mask`` marks
    (what transformers computes from ``labels`` with -100 on the rest)."""
    total, count = loss_sums(model, input_ids, attention_mask, loss_mask, targets_per_row)
    return total / jnp.maximum(count, 1.0)


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
    """AdamW on the adapters only (after gradient clipping to ``clip_norm``, if given); on a sharded model
    its state is replicated over the mesh, as the adapters are."""
    if not nnx.to_flat_state(nnx.state(model, nnx.LoRAParam)):
        raise ValueError("the model has no LoRA adapters to train: llama_jax.add_lora(model, ...) first")
    adamw = optax.adamw(learning_rate, b1=0.9, b2=0.999, eps=1e-8, weight_decay=weight_decay)
    tx = adamw if clip_norm is None else optax.chain(optax.clip_by_global_norm(clip_norm), adamw)
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.LoRAParam)
    placement = replicated(model)
    if placement is not None:  # on a mesh: where the train step keeps every array it updates, from the
        # start (the step counts would begin on one device, and the second step would compile again)
        nnx.update(optimizer, jax.device_put(nnx.state(optimizer), placement))
    return optimizer


def _trained(path, value) -> bool:
    """What a train step changes, in ``nnx.split((model, optimizer), ...)``: the model's adapters and the
    optimizer's whole state (the rest, the frozen base, goes in and does not come back out)."""
    return path[0] == 1 or isinstance(value, nnx.LoRAParam)


@functools.partial(jax.jit, static_argnames=("graphdef", "replicated", "targets_per_row"))
def _pure_train_step(
    graphdef, trained, frozen, input_ids, attention_mask, loss_mask, replicated=None, targets_per_row=None
):
    """One step as a function of arrays: returns the loss and the new ``trained`` state. The frozen weights
    are an input only, so XLA copies none of them into the step's outputs (``nnx.jit`` over the model
    would return, and so copy, every weight at every step)."""
    model, optimizer = nnx.merge(graphdef, trained, frozen)
    grad_fn = nnx.value_and_grad(causal_lm_loss, argnums=nnx.DiffState(0, nnx.LoRAParam))
    loss, grads = grad_fn(model, input_ids, attention_mask, loss_mask, targets_per_row)
    optimizer.update(model, grads)
    trained = nnx.state((model, optimizer), _trained)
    if replicated is not None:  # on a mesh: the new adapters and AdamW's state stay whole on every device
        trained = jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x, replicated), trained)
    return loss, trained


def _train_step(
    model, optimizer, input_ids, attention_mask, loss_mask, replicated=None, targets_per_row=None
):
    """Run one step and put its new adapters and optimizer state back into ``model`` and ``optimizer``;
    returns the loss on the device (reading it waits for the step)."""
    graphdef, trained, frozen = nnx.split((model, optimizer), _trained, ...)
    loss, trained = _pure_train_step(
        graphdef, trained, frozen, input_ids, attention_mask, loss_mask, replicated, targets_per_row
    )
    nnx.update((model, optimizer), trained)
    return loss


def replicated(model) -> NamedSharding | None:
    """Where a sharded model's adapters and optimizer state live: whole on every device of its mesh
    (None on one device). The train step keeps them there; left to itself, XLA's sharding propagation
    would split the updated ones like the kernels they adapt, and the next step would compile again
    for the new placement."""
    return _replicated_on(mesh_of(model))


def _replicated_on(mesh) -> NamedSharding | None:
    """``replicated(model)`` for a mesh already found (None: one device)."""
    return None if mesh is None else NamedSharding(mesh, P())


def _on_mesh(mesh, *arrays):
    """The batch as global arrays on ``mesh`` (a sharded model's, ``mesh_of(model)``; None on one
    device). On a mesh the arrays hold *this process's* rows (every row in a one-process job): they go to
    this process's devices along the mesh's "batch" axis, and the global batch is every process's rows in
    process order (``jax.make_array_from_process_local_data``)."""
    if mesh is None:
        return [jnp.asarray(a) for a in arrays]
    here = np.vectorize(lambda d: d.process_index == jax.process_index())(mesh.devices)
    shards = int(here.any(axis=1).sum())  # how many slices of the "batch" axis this process's devices hold
    if arrays[0].shape[0] % shards:
        where = "" if jax.process_count() == 1 else f" (process {jax.process_index()}'s rows)"
        raise ValueError(
            f"batch of {arrays[0].shape[0]} rows{where} is not a multiple of the mesh's 'batch' axis ({shards})"
        )
    rows = NamedSharding(mesh, P("batch"))
    return [jax.make_array_from_process_local_data(rows, a) for a in arrays]


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


def targets_per_row_for(loss_mask, attention_mask) -> int | None:
    """The most target positions of any row (rounded up to a multiple of 32, so that few programs are
    compiled): the loss needs logits for no more. None (every position) in a job of several processes,
    where each sees only its own rows and all must run the same program."""
    if jax.process_count() > 1:
        return None
    targets = np.asarray(loss_mask)[:, 1:] * np.asarray(attention_mask)[:, 1:]
    most = int((targets != 0).sum(axis=1).max(initial=0))
    return min(-(-max(most, 1) // 32) * 32, targets.shape[1])


def _step_inputs(model: LlamaForCausalLM, input_ids, attention_mask, loss_mask) -> tuple[list, dict]:
    """The checked batch on the model's devices, and the train step's static arguments for it."""
    ids, mask, targets = _check_batch(input_ids, attention_mask, loss_mask)
    mesh = mesh_of(model)  # once
    static = dict(replicated=_replicated_on(mesh), targets_per_row=targets_per_row_for(targets, mask))
    return _on_mesh(mesh, ids, mask, targets), static


def train_step(
    model: LlamaForCausalLM, optimizer: nnx.Optimizer, input_ids, attention_mask, loss_mask
) -> float:
    """One optimizer step on one batch (compiled once per batch shape); returns the batch's loss."""
    batch, static = _step_inputs(model, input_ids, attention_mask, loss_mask)
    return float(host_value(_train_step(model, optimizer, *batch, **static)))


def lower_train_step(
    model: LlamaForCausalLM, optimizer: nnx.Optimizer, input_ids, attention_mask, loss_mask
) -> jax.stages.Lowered:
    """``train_step`` for this batch, lowered but not run: ``.compile().as_text()`` shows the collectives
    XLA inserted on a mesh, ``.compile().memory_analysis()`` the bytes the step needs."""
    batch, static = _step_inputs(model, input_ids, attention_mask, loss_mask)
    graphdef, trained, frozen = nnx.split((model, optimizer), _trained, ...)
    return _pure_train_step.lower(graphdef, trained, frozen, *batch, **static)


@nnx.jit
def _eval_loss(model, input_ids, attention_mask, loss_mask):
    return causal_lm_loss(model, input_ids, attention_mask, loss_mask)


def evaluate(model: LlamaForCausalLM, input_ids, attention_mask, loss_mask) -> float:
    """The loss on a batch, without training."""
    batch = _on_mesh(mesh_of(model), *_check_batch(input_ids, attention_mask, loss_mask))
    return float(host_value(_eval_loss(model, *batch)))


_loss_sums = nnx.jit(loss_sums)


def held_out_loss(model: LlamaForCausalLM, dataset: Dataset, batch_size: int) -> float:
    """The mean loss over every target token of ``dataset`` (``llama_jax.data``), in file order."""
    total = count = 0.0
    mesh = mesh_of(model)
    for batch in eval_batches(
        dataset, batch_size, process_index=jax.process_index(), process_count=jax.process_count()
    ):
        batch_total, batch_count = _loss_sums(model, *_on_mesh(mesh, *batch))
        total, count = total + float(host_value(batch_total)), count + float(host_value(batch_count))
    return total / max(count, 1.0)


def perplexity(model: LlamaForCausalLM, token_ids, window: int = 256, batch_size: int = 8) -> float:
    """exp(mean next-token cross-entropy) over a token sequence, read in consecutive windows of
    ``window`` tokens (each window starts afresh: its first token is context only, as in transformers'
    fixed-length perplexity); the last window is padded, and so is the last batch, with rows that
    count no target (one shape, one compilation)."""
    ids = np.asarray(token_ids, np.int32).ravel()
    if ids.size < 2:
        raise ValueError(f"perplexity needs at least 2 tokens, got {ids.size}")
    windows = -(-ids.size // window)
    rows = -(-windows // batch_size) * batch_size
    input_ids = np.zeros((rows, window), np.int32)
    attention_mask = np.ones((rows, window), np.int32)
    loss_mask = np.zeros((rows, window), np.int32)
    input_ids.ravel()[: ids.size] = ids
    attention_mask[windows - 1].ravel()[ids.size - (windows - 1) * window :] = 0  # the last window's padding
    loss_mask.ravel()[: ids.size] = 1
    total = count = 0.0
    mesh = mesh_of(model)
    for start in range(0, rows, batch_size):
        batch = (a[start : start + batch_size] for a in (input_ids, attention_mask, loss_mask))
        batch_total, batch_count = _loss_sums(model, *_on_mesh(mesh, *batch))
        total, count = total + float(host_value(batch_total)), count + float(host_value(batch_count))
    return float(np.exp(total / count))


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


# ------------------------------------------------------------------------------ training state on disk

STATE_DIR = "state"  # under a run's output directory: orbax checkpoints, one directory per saved step
RUN_FILE = "run.json"  # what the run is (model, adapters, data, batch): a resumed run must match it
RUN_FIELDS = ("model", "rank", "alpha", "targets", "dtype", "batch_size", "max_length", "seed", "data")


def _pure(state) -> dict:
    return nnx.to_pure_dict(state)


def _abstract(tree):
    """Shapes, dtypes and placements of ``tree``'s arrays: orbax restores each array where it lives now."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def _manager(directory: str):
    import orbax.checkpoint as ocp

    options = ocp.CheckpointManagerOptions(max_to_keep=2, create=True, enable_async_checkpointing=False)
    return ocp.CheckpointManager(os.path.abspath(os.path.join(directory, STATE_DIR)), options=options)


def save_state(
    directory: str, model: LlamaForCausalLM, optimizer: nnx.Optimizer, step: int, meta: dict
) -> None:
    """Save the adapters, the optimizer state (AdamW's moments and count) and ``meta`` (JSON: step, data
    position, losses) as orbax checkpoint ``step`` under ``directory/state``. Orbax writes into a temporary
    directory and renames it when complete, so a run killed mid-save leaves the previous save intact."""
    import orbax.checkpoint as ocp

    manager = _manager(directory)
    try:
        manager.save(
            step,
            args=ocp.args.Composite(
                adapters=ocp.args.StandardSave(_pure(nnx.state(model, nnx.LoRAParam))),
                optimizer=ocp.args.StandardSave(_pure(nnx.state(optimizer))),
                meta=ocp.args.JsonSave({**meta, "step": step}),
            ),
            force=True,
        )
        manager.wait_until_finished()
    finally:
        manager.close()


def saved_steps(directory: str) -> list[int]:
    """The steps of the complete saves under ``directory/state`` (half-written ones are not listed)."""
    if not os.path.isdir(os.path.join(directory, STATE_DIR)):
        return []
    manager = _manager(directory)
    try:
        return sorted(manager.all_steps())
    finally:
        manager.close()


def restore_state(directory: str, model: LlamaForCausalLM, optimizer: nnx.Optimizer) -> dict:
    """Load the newest complete save under ``directory/state`` into ``model``'s adapters and ``optimizer``
    (each array placed where it lives now, so a sharded run restores sharded); returns its ``meta``."""
    import orbax.checkpoint as ocp

    manager = _manager(directory)
    try:
        step = manager.latest_step()
        if step is None:
            raise ValueError(
                f"{os.path.join(directory, STATE_DIR)}: no complete training state to resume from"
            )
        adapters, opt = nnx.state(model, nnx.LoRAParam), nnx.state(optimizer)
        restored = manager.restore(
            step,
            args=ocp.args.Composite(
                adapters=ocp.args.StandardRestore(_abstract(_pure(adapters))),
                optimizer=ocp.args.StandardRestore(_abstract(_pure(opt))),
                meta=ocp.args.JsonRestore(),
            ),
        )
    finally:
        manager.close()
    nnx.replace_by_pure_dict(adapters, restored.adapters)
    nnx.replace_by_pure_dict(opt, restored.optimizer)
    nnx.update(model, adapters)
    nnx.update(optimizer, opt)
    return dict(restored.meta)


# ------------------------------------------------------------------------------------- a whole run


@dataclasses.dataclass
class FinetuneResult:
    """What ``finetune`` did. Losses cover the whole run, including the steps before a resume."""

    output: str
    steps: int  # steps done, in all
    losses: list[float]  # the training loss of every step
    held_out: dict[int, float]  # step -> mean loss on the validation set (step 0: before training)
    resumed_from: int  # the step this call started from (0 for a new run)
    seconds: float  # wall time of this call's steps, the first (compiling) one included
    first_step_seconds: float
    tokens_per_second: float  # real (not padding) tokens of this call's batches per second
    truncated: int  # training rows cut to max_length


def learning_rate_schedule(learning_rate: float, steps: int, schedule: str, warmup: int) -> optax.Schedule:
    """``"constant"`` (after a linear warmup from 0 over ``warmup`` steps) or ``"cosine"`` (warmup, then
    cosine decay to 0 at ``steps``)."""
    if schedule == "cosine":
        return warmup_cosine(learning_rate, steps, warmup)
    if schedule != "constant":
        raise ValueError(f"schedule {schedule!r}: expected 'constant' or 'cosine'")
    if warmup <= 0:
        return optax.constant_schedule(learning_rate)
    ramp = optax.linear_schedule(0.0, learning_rate, warmup)
    return optax.join_schedules([ramp, optax.constant_schedule(learning_rate)], [warmup])


def _write_json(path: str, value: dict) -> None:
    """Write JSON next to ``path`` and rename it into place: never half a file."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(value, f, indent=2)
    os.replace(tmp, path)


def _check_output(output: str, resume: bool) -> dict | None:
    """The saved run description of ``output`` when resuming; refuses to train over another run."""
    run_path = os.path.join(output, RUN_FILE)
    if resume:
        if not os.path.isfile(run_path):
            raise ValueError(f"--resume: {output} holds no run to resume ({RUN_FILE} is missing)")
        with open(run_path) as f:
            return json.load(f)
    if os.path.isfile(run_path):
        raise ValueError(
            f"--output {output} already holds a run: pass --resume to continue it, or another --output"
        )
    if os.path.isdir(output) and os.listdir(output):
        raise ValueError(f"--output {output} is not empty: choose a new or empty directory")
    if os.path.exists(output) and not os.path.isdir(output):
        raise ValueError(f"--output {output} is a file, not a directory")
    return None


def _check_same_run(saved: dict, run: dict, output: str) -> None:
    for field in RUN_FIELDS:
        if saved.get(field) != run[field]:
            what = "another dataset" if field == "data" else f"{field}={run[field]!r}"
            raise ValueError(
                f"--resume: {output} was trained with {field}={saved.get(field)!r}; this run has {what}: "
                "resume with the same options, or start a new run in another --output"
            )


def _eta(seconds: float) -> str:
    seconds = round(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def finetune(
    model: LlamaForCausalLM,
    tokenizer,
    data: str | os.PathLike,
    output: str | os.PathLike,
    *,
    base: str,
    rank: int = 8,
    alpha: float = 16.0,
    targets: Sequence[str] = TARGETS,
    steps: int = 1000,
    batch_size: int = 4,
    learning_rate: float = 1e-4,
    schedule: str = "constant",
    warmup: int = 0,
    max_length: int = 2048,
    save_every: int = 100,
    eval_every: int | None = None,
    resume: bool = False,
    seed: int = 0,
    remat: bool = False,
    progress: bool | None = None,
    log=None,
) -> FinetuneResult:
    """Fine-tune LoRA adapters on ``data`` (a ``.jsonl`` file or a directory with ``train.jsonl`` and an
    optional ``valid.jsonl``, in mlx-lm's formats: see ``llama_jax.data``) and write them to ``output``.

    ``model`` is loaded already (on a mesh, in bfloat16, as wanted) and ``base`` names it (a hub id or a
    path: written to the adapter's config and checked on ``resume``). Every ``save_every`` steps and at
    the end, ``output`` receives the adapter in peft's format and the training state (adapters, AdamW's
    state, step, data position, losses) through orbax; ``resume=True`` continues from the newest complete
    save, giving the adapters the uninterrupted run gives. The held-out loss is computed before training,
    every ``eval_every`` steps (default: at each save) and at the end when there is a validation file.
    ``progress``: a bar (loss, tokens/s, time left) on a terminal, plain lines through ``log`` otherwise."""
    for name, value, least in (("steps", steps, 1), ("batch", batch_size, 1), ("save-every", save_every, 1)):
        if value < least:
            raise ValueError(f"--{name} must be >= {least}, got {value}")
    if eval_every is not None and eval_every < 1:
        raise ValueError(f"--eval-every must be >= 1, got {eval_every}")
    output = os.path.abspath(os.fspath(output))
    log = log or (lambda line: print(line, file=sys.stderr, flush=True))
    processes, me = jax.process_count(), jax.process_index()
    saved_run = _check_output(output, resume) if me == 0 or resume else None  # one process checks
    if batch_size % processes:
        raise ValueError(f"--batch {batch_size} cannot be split evenly over {processes} processes")
    mesh = mesh_of(model)
    if mesh is not None and batch_size % mesh.shape["batch"]:
        raise ValueError(
            f"--batch {batch_size} cannot be split over the mesh's 'batch' axis of {mesh.shape['batch']}: "
            "use a multiple of it"
        )
    schedule_fn = learning_rate_schedule(learning_rate, steps, schedule, warmup)
    train_file, valid_file = data_files(data)
    train = load_dataset(train_file, tokenizer, max_length)
    valid = load_dataset(valid_file, tokenizer, max_length) if valid_file else None
    if train.truncated:
        log(
            f"{train.truncated} of {len(train)} training rows were longer than --max-length {max_length}: cut"
        )
    run = {
        "model": os.fspath(base),
        "rank": rank,
        "alpha": float(alpha),
        "targets": sorted(targets),
        "dtype": str(model.model.embed_tokens.embedding.get_value().dtype),
        "batch_size": batch_size,
        "max_length": max_length,
        "seed": seed,
        "data": train.fingerprint,
    }
    if saved_run is not None:
        _check_same_run(saved_run, run, output)

    add_lora(model, rank=rank, alpha=alpha, targets=targets, seed=seed)
    model.model.gradient_checkpointing = remat
    optimizer = lora_optimizer(model, schedule_fn)
    losses: list[float] = []
    held_out: dict[int, float] = {}
    start = 0
    if saved_run is not None:
        meta = restore_state(output, model, optimizer)
        start, losses = meta["step"], list(meta["losses"])
        held_out = {int(k): v for k, v in meta["held_out"].items()}
        log(f"resuming {output} from step {start}")
    elif me == 0:
        os.makedirs(output, exist_ok=True)
        _write_json(os.path.join(output, RUN_FILE), {**run, "data_path": os.path.abspath(os.fspath(data))})
    if valid is not None and 0 not in held_out:
        held_out[0] = held_out_loss(model, valid, batch_size)
        log(f"step 0: held-out loss {held_out[0]:.4f}")

    eval_every = eval_every or save_every
    placement = _replicated_on(mesh)
    adapter_base = hub_id(base) or os.fspath(base)  # what peft's AutoPeftModel will look for
    bar_wanted = sys.stderr.isatty() if progress is None else progress
    bar = tqdm(total=steps, initial=start, desc="finetune", disable=not bar_wanted, leave=False)
    pending: list[jax.Array] = []  # this call's losses not yet read back (reading one waits for its step)
    tokens, began, first_step = 0, time.perf_counter(), 0.0

    def report(step: int) -> None:
        losses.extend(float(host_value(x)) for x in pending)
        pending.clear()
        elapsed = time.perf_counter() - began
        rate = tokens / max(elapsed, 1e-9)
        left = elapsed / (step - start) * (steps - step)
        bar.set_postfix(loss=f"{np.mean(losses[-10:]):.3f}", tok_s=f"{rate:,.0f}")
        if not bar_wanted:
            log(
                f"step {step}/{steps}: loss {np.mean(losses[-10:]):.4f}, {rate:,.0f} tokens/s, {_eta(left)} left"
            )

    for step in range(start, steps):
        batch = batch_at(train, step, batch_size, seed=seed, process_index=me, process_count=processes)
        pending.append(
            _train_step(
                model,
                optimizer,
                *_on_mesh(mesh, *batch),
                replicated=placement,
                targets_per_row=targets_per_row_for(batch[2], batch[1]),
            )
        )
        tokens += int(batch[1].sum()) * processes
        if step == start:
            pending[-1].block_until_ready()
            first_step = time.perf_counter() - began
        bar.update()
        done = step + 1
        if done % 10 == 0 or done == steps or done % save_every == 0 or done % eval_every == 0:
            report(done)
        if valid is not None and (done % eval_every == 0 or done == steps):
            held_out[done] = held_out_loss(model, valid, batch_size)
            log(f"step {done}: held-out loss {held_out[done]:.4f}")
        if done % save_every == 0 or done == steps:
            meta = {"losses": losses, "held_out": held_out, "seed": seed, "data": train.fingerprint}
            save_state(output, model, optimizer, done, {**meta, "rows_seen": done * batch_size})
            if me == 0:
                save_adapter(model, output, base_model_name_or_path=adapter_base, overwrite=True)
            if not bar_wanted:
                log(f"step {done}: saved {output}")
    bar.close()
    seconds = time.perf_counter() - began
    return FinetuneResult(
        output=output,
        steps=max(start, steps),
        losses=losses,
        held_out=held_out,
        resumed_from=start,
        seconds=seconds,
        first_step_seconds=first_step,
        tokens_per_second=tokens / max(seconds, 1e-9),
        truncated=train.truncated,
    )

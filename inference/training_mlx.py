"""LoRA training on MLX with mlx-lm's tuner: chat examples in, mlx-lm adapter files out.

    result = train_lora_mlx(model_folder, examples, TrainingConfig(steps=200), checkpoint_dir=dir)
    result.files  # adapters.safetensors + adapter_config.json, accepted by parse_adapter

The same contract as `inference.training.train_lora` (torch): the same tokens and answer-only
targets, the same batches per (seed, step), the same warmup-then-cosine learning rate, AdamW
with gradient clipping, progress and checkpoint callbacks, `TrainingCancelled` and
`TrainingDiverged`. mlx-lm supplies the pieces: `linear_to_lora_layers` puts its
`LoRALinear`s on the target projections and `default_loss` is the masked cross-entropy.
Our own loop drives them (not `mlx_lm.tuner.train`), because resuming after a crash needs the
optimizer state checkpointed and the batch of a step fixed by the step alone.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from inference.backends.base import never_cancelled
from inference.lora.adapter import PARENTS, Canonical, mlx_files
from inference.training import (
    CHECKPOINT_PREFIX,
    IGNORE,
    Example,
    Progress,
    TrainingCancelled,
    TrainingConfig,
    TrainingDiverged,
    TrainingError,
    TrainingResult,
    batch_indices,
    latest_checkpoint,
    lr_factor,
    tokenize,
)

ADAPTER_FILE = "adapter.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"


def load_for_training_mlx(model_folder: Path, config: TrainingConfig) -> tuple[Any, Any]:
    """(mlx-lm model, frozen but for fresh LoRA factors on the target modules; its tokenizer)."""
    import mlx.core as mx
    from mlx_lm.tuner.utils import linear_to_lora_layers
    from mlx_lm.utils import load
    from transformers import AutoTokenizer

    model, _ = load(str(model_folder))
    model.freeze()
    mx.random.seed(config.seed)  # LoRALinear draws lora_a from mlx's generator
    keys = [f"{PARENTS[m]}.{m}" for m in config.target_modules]
    lora = {"rank": config.rank, "scale": config.alpha / config.rank, "dropout": 0.0, "keys": keys}
    linear_to_lora_layers(model, len(model.layers), lora)
    model.train()
    # The tokenizer the torch trainer uses: the same chat template, so the same tokens.
    return model, AutoTokenizer.from_pretrained(model_folder)


def train_lora_mlx(
    model_folder: Path,
    examples: Sequence[Example],
    config: TrainingConfig,
    *,
    base_model: str | None = None,
    checkpoint_dir: Path | None = None,
    checkpoint_every: int = 0,
    on_progress: Callable[[Progress], None] | None = None,
    progress_every: int = 1,
    on_checkpoint: Callable[[int, Path], None] | None = None,
    cancelled: Callable[[], bool] = never_cancelled,
) -> TrainingResult:
    """Train a LoRA adapter on `examples` with mlx; the arguments are those of `train_lora`."""
    import mlx.core as mx
    import mlx.nn as nn
    import mlx.optimizers as optim
    from mlx.utils import tree_flatten
    from mlx_lm.tuner.trainer import default_loss

    if not examples:
        raise ValueError("examples: expected at least one, got none")
    if progress_every < 1:
        raise ValueError(f"progress_every: expected at least 1, got {progress_every}")
    model, tokenizer = load_for_training_mlx(Path(model_folder), config)
    rows = tokenize(tokenizer, examples, config.max_length)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    optimizer = optim.AdamW(learning_rate=config.learning_rate, weight_decay=config.weight_decay)
    loss_and_grad = nn.value_and_grad(model, default_loss)
    losses: list[float] = []
    tokens = 0
    start_step = 0
    checkpoint = latest_checkpoint(checkpoint_dir) if checkpoint_dir is not None else None
    if checkpoint is not None:
        start_step, losses, tokens = _load_checkpoint(checkpoint, model, optimizer)
    started = time.perf_counter()
    for step in range(start_step, config.steps):
        if cancelled():
            raise TrainingCancelled(step)
        batch, bounds = collate_mlx([rows[i] for i in batch_indices(step, len(rows), config)], pad_id)
        learning_rate = config.learning_rate * lr_factor(step, config)
        optimizer.learning_rate = learning_rate
        (loss, count), grads = loss_and_grad(model, batch, bounds)
        value = loss.item()
        if not math.isfinite(value):
            raise TrainingDiverged(step + 1, value)
        if config.max_grad_norm > 0:
            grads, _ = optim.clip_grad_norm(grads, config.max_grad_norm)
        optimizer.update(model, grads)
        mx.eval(model.trainable_parameters(), optimizer.state)
        losses.append(value)
        tokens += int(count.item())
        done = step + 1
        if on_progress is not None and (done % progress_every == 0 or done == config.steps):
            on_progress(Progress(done, value, learning_rate, tokens, time.perf_counter() - started))
        if checkpoint_dir is not None and checkpoint_every > 0 and (done % checkpoint_every == 0 or done == config.steps):
            folder = _save_checkpoint(Path(checkpoint_dir), done, dict(tree_flatten(model.trainable_parameters())),
                                      dict(tree_flatten(optimizer.state)), losses, tokens)
            if on_checkpoint is not None:
                on_checkpoint(done, folder)
    canonical = lora_factors_mlx(model)
    files = mlx_files(canonical, config.rank, config.alpha / config.rank, config.target_modules, base_model)
    return TrainingResult(
        canonical=canonical,
        files=files,
        losses=tuple(losses),
        steps=config.steps,
        tokens=tokens,
        seconds=time.perf_counter() - started,
        resumed_from=start_step,
    )


def collate_mlx(rows: Sequence[tuple[list[int], list[int]]], pad_id: int) -> tuple[Any, Any]:
    """Right-padded ids and, per row, the (first, last) target positions `default_loss` masks with.

    `default_loss` scores target t (the token at t + 1) when first <= t + 1 <= last: the
    answer tokens, exactly those the labels do not ignore.
    """
    import mlx.core as mx

    width = max(len(ids) for ids, _ in rows)
    ids = np.full((len(rows), width), pad_id, dtype=np.int32)
    bounds = np.zeros((len(rows), 2), dtype=np.int32)
    for number, (row, labels) in enumerate(rows):
        ids[number, : len(row)] = row
        answer = [position for position, label in enumerate(labels) if label != IGNORE and position > 0]
        bounds[number] = (answer[0], answer[-1])
    return mx.array(ids), mx.array(bounds)


def lora_factors_mlx(model: Any) -> Canonical:
    """The trained factors in canonical form: "layers.{i}.{module}" -> (A (r, in), B (out, r))."""
    import mlx.core as mx

    factors: Canonical = {}
    for index, block in enumerate(model.layers):
        for module, parent in PARENTS.items():
            layer = getattr(getattr(block, parent), module, None)
            if layer is None or not hasattr(layer, "lora_a"):
                continue
            # mlx-lm's a is (in, r) and b (r, out): the transposes of PEFT's A and B.
            a = np.array(layer.lora_a.astype(mx.float32))
            b = np.array(layer.lora_b.astype(mx.float32))
            factors[f"layers.{index}.{module}"] = (a.T.copy(), b.T.copy())
    return factors


# --- checkpoints --------------------------------------------------------------------------


def _save_checkpoint(directory: Path, step: int, weights: dict[str, Any], optimizer: dict[str, Any],
                     losses: list[float], tokens: int) -> Path:
    import mlx.core as mx

    directory.mkdir(parents=True, exist_ok=True)
    final = directory / f"{CHECKPOINT_PREFIX}{step:08d}"
    partial = directory / f".partial-{step:08d}-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir()
    mx.save_safetensors(str(partial / ADAPTER_FILE), weights)
    mx.save_safetensors(str(partial / OPTIMIZER_FILE), optimizer)
    (partial / "state.json").write_text(json.dumps({"step": step, "losses": losses, "tokens": tokens}))
    # Renamed into place whole, as the torch trainer does: a crash mid-save leaves a .partial.
    shutil.rmtree(final, ignore_errors=True)
    os.replace(partial, final)
    return final


def _load_checkpoint(folder: Path, model: Any, optimizer: Any) -> tuple[int, list[float], int]:
    import mlx.core as mx
    from mlx.utils import tree_flatten, tree_unflatten

    weights = mx.load(str(folder / ADAPTER_FILE))
    differing = set(dict(tree_flatten(model.trainable_parameters()))) ^ set(weights)
    if differing:
        raise TrainingError(f"{folder}: expected a checkpoint of this model and config, got other tensors "
                            f"({sorted(differing)[:3]})")
    model.update(tree_unflatten(list(weights.items())))
    optimizer.state = tree_unflatten(list(mx.load(str(folder / OPTIMIZER_FILE)).items()))
    state = json.loads((folder / "state.json").read_text())
    return int(state["step"]), [float(x) for x in state["losses"]], int(state["tokens"])

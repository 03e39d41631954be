"""LoRA training on MLX with mlx-lm's tuner: chat examples in, mlx-lm adapter files out.

    result = train_lora_mlx(model_folder, examples, TrainingConfig(steps=200), checkpoint_dir=dir)
    result.files  # adapters.safetensors + adapter_config.json, accepted by parse_adapter

The loop is `inference.training.loop.train`, the one the torch trainer runs: the same tokens
and answer-only targets, the same batches per (seed, step), the same learning rate, progress,
checkpoints, cancellation and divergence check. mlx-lm supplies this module's pieces:
`linear_to_lora_layers` puts its `LoRALinear`s on the target projections and `default_loss` is
the masked cross-entropy. Our loop drives them (not `mlx_lm.tuner.train`), because resuming
after a crash needs the optimizer state checkpointed and the batch of a step fixed by the step alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Unpack

import numpy as np

from inference.lora.adapter import PARENTS, Canonical, mlx_files
from inference.training.loop import (
    IGNORE,
    Example,
    Row,
    TrainingConfig,
    TrainingError,
    TrainingOptions,
    TrainingResult,
    pad_id,
    train,
)

ADAPTER_FILE = "adapter.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"


def train_lora_mlx(
    model_folder: Path, examples: Sequence[Example], config: TrainingConfig, **options: Unpack[TrainingOptions]
) -> TrainingResult:
    """Train an mlx-lm LoRA adapter on `examples` with mlx; the options are those of `loop.train`."""
    return train(MlxTrainer, model_folder, examples, config, **options)


class MlxTrainer:
    """An mlx-lm model with fresh LoRALinear factors and its AdamW: the loop's mlx backend."""

    def __init__(self, model_folder: Path, config: TrainingConfig) -> None:
        import mlx.nn as nn
        import mlx.optimizers as optim
        from mlx_lm.tuner.trainer import default_loss

        self.model, self.tokenizer = load_for_training_mlx(model_folder, config)
        self.config = config
        self.pad_id = pad_id(self.tokenizer)
        self.optimizer = optim.AdamW(learning_rate=config.learning_rate, weight_decay=config.weight_decay)
        self.loss_and_grad = nn.value_and_grad(self.model, default_loss)
        self.pending: Any = None  # the last loss's gradients, until `update` applies them

    def loss(self, batch: Sequence[Row]) -> float:
        ids, bounds = collate_mlx(batch, self.pad_id)
        (loss, _), self.pending = self.loss_and_grad(self.model, ids, bounds)
        return float(loss.item())

    def evaluate(self, batch: Sequence[Row]) -> tuple[float, int, int]:
        import mlx.core as mx
        import mlx.nn as nn

        ids, _ = collate_mlx(batch, self.pad_id)
        width = ids.shape[1]
        labels = np.full((len(batch), width), IGNORE, dtype=np.int64)
        for number, (_, row) in enumerate(batch):
            labels[number, : len(row)] = row
        # Position t predicts the token at t + 1.
        logits = self.model(ids[:, :-1]).astype(mx.float32)
        targets = labels[:, 1:]
        scored = targets != IGNORE
        safe = mx.array(np.where(scored, targets, 0))
        losses = np.array(nn.losses.cross_entropy(logits, safe, reduction="none"))
        predicted = np.array(mx.argmax(logits, axis=-1))
        return float(losses[scored].sum()), int((predicted == targets)[scored].sum()), int(scored.sum())

    def update(self, learning_rate: float) -> None:
        import mlx.core as mx
        import mlx.optimizers as optim

        self.optimizer.learning_rate = learning_rate
        grads = self.pending
        if self.config.max_grad_norm > 0:
            grads, _ = optim.clip_grad_norm(grads, self.config.max_grad_norm)
        self.optimizer.update(self.model, grads)
        mx.eval(self.model.trainable_parameters(), self.optimizer.state)
        self.pending = None

    def save(self, folder: Path) -> None:
        import mlx.core as mx
        from mlx.utils import tree_flatten

        mx.save_safetensors(str(folder / ADAPTER_FILE), dict(tree_flatten(self.model.trainable_parameters())))
        mx.save_safetensors(str(folder / OPTIMIZER_FILE), dict(tree_flatten(self.optimizer.state)))

    def load(self, folder: Path) -> None:
        import mlx.core as mx
        from mlx.utils import tree_flatten, tree_unflatten

        weights = mx.load(str(folder / ADAPTER_FILE))
        differing = set(dict(tree_flatten(self.model.trainable_parameters()))) ^ set(weights)
        if differing:
            raise TrainingError(f"{folder}: expected a checkpoint of this model and config, got other tensors "
                                f"({sorted(differing)[:3]})")
        self.model.update(tree_unflatten(list(weights.items())))
        self.optimizer.state = tree_unflatten(list(mx.load(str(folder / OPTIMIZER_FILE)).items()))

    def factors(self) -> Canonical:
        return lora_factors_mlx(self.model)

    def files(self, canonical: Canonical, base_model: str | None) -> dict[str, bytes]:
        scale = self.config.alpha / self.config.rank
        return mlx_files(canonical, self.config.rank, scale, self.config.target_modules, base_model)


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


def collate_mlx(rows: Sequence[Row], pad_id: int) -> tuple[Any, Any]:
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

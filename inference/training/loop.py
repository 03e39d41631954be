"""The one LoRA training loop every backend runs, and the types it shares with its callers.

    result = train(TorchTrainer, model_folder, examples, TrainingConfig(steps=200), checkpoint_dir=dir)

The loop owns everything that does not depend on the tensor library: checking the inputs,
tokenising, the batch of each step, the learning-rate schedule, stopping on a non-finite loss
or on `cancelled()`, progress reports, checkpoint cadence and resuming from the newest
checkpoint. A `TrainerBackend` (`inference.training.torch`, `inference.training.mlx`) owns the
model: one step's loss and update, its part of a checkpoint, and the trained factors.

The loss is next-token cross-entropy on the assistant turn only (the prompt is context,
not a target). The learning rate warms up linearly, then follows a cosine to
`min_lr_ratio` of its peak. The batch of step s depends only on (seed, s) and the
examples' lengths, so a run resumed from a checkpoint (adapter + optimizer + step) sees the
same batches as one that never stopped and ends with the same adapter. Batches are
length-bucketed: each pass's shuffled order is sorted by length within windows of
`BUCKET_BATCHES` batches, so a batch pads its rows to a length close to their own.

With `validation` examples, the adapter is evaluated before the first step, at every
checkpoint and after the last step: the mean loss over the held-out target tokens and
the fraction of them the model predicts exactly (greedy next token).

Knows nothing of the event store: progress, checkpoints and cancellation are callbacks.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol, TypedDict

import msgspec
import numpy as np

from inference.backends.base import ChatMessage, never_cancelled
from inference.lora.adapter import Canonical
from inference.models import PROJECTIONS

IGNORE = -100  # the label cross-entropy skips: prompt and padding positions
CHECKPOINT_PREFIX = "step-"
# A window of this many batches is sorted by length before it is cut into batches: short rows
# share batches with short rows, while the order stays random at the scale of a pass.
BUCKET_BATCHES = 8
STATE_FILE = "state.json"

Row = tuple[list[int], list[int]]  # (input ids, labels) of one tokenised example


class TrainingError(RuntimeError):
    """Training could not go on; the message says at which step and why."""


class TrainingDiverged(TrainingError):
    """The loss became NaN or infinite: more steps would only spread it through the adapter."""

    def __init__(self, step: int, loss: float) -> None:
        super().__init__(f"training stopped at step {step}: the loss is {loss} (lower the learning rate)")
        self.step = step
        self.loss = loss


class TrainingCancelled(TrainingError):
    """`cancelled()` answered true between two steps."""

    def __init__(self, step: int) -> None:
        super().__init__(f"training cancelled after step {step}")
        self.step = step


class Example(msgspec.Struct, frozen=True):
    """One chat; the last message is the assistant answer the adapter learns to give."""

    messages: tuple[ChatMessage, ...]


class TrainingConfig(msgspec.Struct, frozen=True, kw_only=True):
    rank: int = 8
    alpha: float = 16.0
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")
    steps: int = 100
    batch_size: int = 4
    learning_rate: float = 2e-4
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    max_length: int = 512
    seed: int = 0
    device: str = "auto"
    bucket_by_length: bool = True

    def __post_init__(self) -> None:
        checks = (
            (self.rank >= 1, f"rank: expected at least 1, got {self.rank}"),
            (self.alpha > 0, f"alpha: expected a positive number, got {self.alpha}"),
            (self.steps >= 1, f"steps: expected at least 1, got {self.steps}"),
            (self.batch_size >= 1, f"batch_size: expected at least 1, got {self.batch_size}"),
            (
                math.isfinite(self.learning_rate) and self.learning_rate > 0,
                f"learning_rate: expected a positive number, got {self.learning_rate}",
            ),
            (0 <= self.warmup_steps < self.steps, f"warmup_steps: expected 0..steps-1, got {self.warmup_steps}"),
            (0.0 <= self.min_lr_ratio <= 1.0, f"min_lr_ratio: expected a number in [0, 1], got {self.min_lr_ratio}"),
            (self.max_length >= 2, f"max_length: expected at least 2, got {self.max_length}"),
            (
                bool(self.target_modules) and set(self.target_modules) <= set(PROJECTIONS),
                f"target_modules: expected a non-empty subset of {', '.join(PROJECTIONS)}, got {self.target_modules}",
            ),
        )
        for ok, message in checks:
            if not ok:
                raise ValueError(message)


class Progress(msgspec.Struct, frozen=True):
    step: int  # steps finished, 1..config.steps
    loss: float  # mean over the batch's target tokens
    learning_rate: float  # the rate this step used
    tokens: int  # target tokens seen so far
    seconds: float  # training time so far (this process)


class Evaluation(msgspec.Struct, frozen=True):
    step: int  # steps trained when it was measured (0: before training)
    loss: float  # mean cross-entropy over the held-out target tokens
    token_accuracy: float  # the fraction of them the model's greedy next token gets right
    tokens: int


class TrainingResult(msgspec.Struct, frozen=True):
    canonical: Canonical
    files: dict[str, bytes]  # the backend's adapter layout (PEFT for torch, mlx-lm for mlx)
    losses: tuple[float, ...]  # every step's loss, including those before a resume
    steps: int
    tokens: int
    seconds: float
    resumed_from: int  # 0 when the run started from scratch
    evaluations: tuple[Evaluation, ...] = ()  # this run's, in step order


class TrainerBackend(Protocol):
    """The part of training that depends on the tensor library: a model with fresh LoRA factors."""

    tokenizer: Any  # a transformers tokenizer: both backends score the same tokens

    def loss(self, batch: Sequence[Row]) -> float:
        """The mean loss over the batch's target tokens; its gradients wait for `update`."""
        ...

    def evaluate(self, batch: Sequence[Row]) -> tuple[float, int, int]:
        """(summed loss, exactly predicted tokens, count) over the batch's target tokens; no gradients."""
        ...

    def update(self, learning_rate: float) -> None:
        """Apply the last `loss`'s gradients (clipped to max_grad_norm) with AdamW at `learning_rate`."""
        ...

    def save(self, folder: Path) -> None:
        """Write the trainable weights and the optimizer state into the (new, empty) `folder`."""
        ...

    def load(self, folder: Path) -> None:
        """Restore what `save` wrote; `TrainingError` when it is not of this model and config."""
        ...

    def factors(self) -> Canonical:
        """The trained factors in canonical form: "layers.{i}.{module}" -> (A (r, in), B (out, r))."""
        ...

    def files(self, canonical: Canonical, base_model: str | None) -> dict[str, bytes]:
        """The adapter files in this backend's own layout."""
        ...


class TrainingOptions(TypedDict, total=False):
    """The keyword arguments of `train`, for the backends' entry points to pass on."""

    base_model: str | None
    checkpoint_dir: Path | None
    checkpoint_every: int
    on_progress: Callable[[Progress], None] | None
    progress_every: int
    on_checkpoint: Callable[[int, Path], None] | None
    cancelled: Callable[[], bool]
    validation: Sequence[Example]
    on_evaluation: Callable[[Evaluation], None] | None


def train(
    open_backend: Callable[[Path, TrainingConfig], TrainerBackend],
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
    validation: Sequence[Example] = (),
    on_evaluation: Callable[[Evaluation], None] | None = None,
) -> TrainingResult:
    """Train a LoRA adapter on `examples`; resume from the newest checkpoint in `checkpoint_dir`.

    `on_progress` gets every `progress_every`-th step and the last one; `on_checkpoint`
    gets (step, folder) after each checkpoint is complete on disk, `on_evaluation` each
    evaluation on `validation` (before step 1 of a fresh run, then with each checkpoint and
    the last step), before the checkpoint's own callback. Raises `TrainingDiverged` on a
    non-finite loss and `TrainingCancelled` when `cancelled()`.
    """
    if not examples:
        raise ValueError("examples: expected at least one, got none")
    if progress_every < 1:
        raise ValueError(f"progress_every: expected at least 1, got {progress_every}")
    backend = open_backend(Path(model_folder), config)
    rows = tokenize(backend.tokenizer, examples, config.max_length)
    held_out = tokenize(backend.tokenizer, validation, config.max_length) if validation else []
    order = BatchOrder(len(rows), config, [len(ids) for ids, _ in rows] if config.bucket_by_length else None)
    evaluations: list[Evaluation] = []

    def evaluated(step: int) -> None:
        if held_out:
            evaluations.append(evaluate(backend, held_out, config.batch_size, step))
            if on_evaluation is not None:
                on_evaluation(evaluations[-1])

    losses: list[float] = []
    tokens = 0
    start_step = 0
    checkpoint = latest_checkpoint(checkpoint_dir) if checkpoint_dir is not None else None
    if checkpoint is not None:
        start_step, losses, tokens = load_checkpoint(checkpoint, backend)
    if start_step == 0:
        evaluated(0)
    elif start_step >= config.steps:
        evaluated(config.steps)  # resumed after the last step: the result still says where it ended
    started = time.perf_counter()
    for step in range(start_step, config.steps):
        if cancelled():
            raise TrainingCancelled(step)
        batch = [rows[i] for i in order.indices(step)]
        learning_rate = config.learning_rate * lr_factor(step, config)
        loss = backend.loss(batch)
        # Checked before the update: a NaN gradient would spread through every factor.
        if not math.isfinite(loss):
            raise TrainingDiverged(step + 1, loss)
        backend.update(learning_rate)
        losses.append(loss)
        tokens += sum(target_count(labels) for _, labels in batch)
        done = step + 1
        if on_progress is not None and (done % progress_every == 0 or done == config.steps):
            on_progress(Progress(done, loss, learning_rate, tokens, time.perf_counter() - started))
        # The last step is checkpointed too: a run resumed after it goes straight to the result.
        checkpointing = checkpoint_dir is not None and checkpoint_every > 0
        if (checkpointing and done % checkpoint_every == 0) or done == config.steps:
            evaluated(done)
        if checkpointing and (done % checkpoint_every == 0 or done == config.steps):
            folder = save_checkpoint(Path(checkpoint_dir), done, backend, losses, tokens)  # type: ignore[arg-type]
            if on_checkpoint is not None:
                on_checkpoint(done, folder)
    canonical = backend.factors()
    return TrainingResult(
        canonical=canonical,
        files=backend.files(canonical, base_model),
        losses=tuple(losses),
        steps=config.steps,
        tokens=tokens,
        seconds=time.perf_counter() - started,
        resumed_from=start_step,
        evaluations=tuple(evaluations),
    )


def evaluate(backend: TrainerBackend, rows: Sequence[Row], batch_size: int, step: int) -> Evaluation:
    """The adapter as it stands on held-out rows: mean target-token loss and greedy accuracy."""
    loss_sum, correct, count = 0.0, 0, 0
    # Sorted by length, so each batch pads little; the sums do not depend on the order.
    ordered = sorted(rows, key=lambda row: len(row[0]))
    for start in range(0, len(ordered), batch_size):
        batch_loss, batch_correct, batch_count = backend.evaluate(ordered[start : start + batch_size])
        loss_sum, correct, count = loss_sum + batch_loss, correct + batch_correct, count + batch_count
    return Evaluation(step, loss_sum / max(1, count), correct / max(1, count), count)


def lr_factor(step: int, config: TrainingConfig) -> float:
    """The learning-rate multiplier for 0-based `step`: linear warmup, then cosine to min_lr_ratio."""
    if step < config.warmup_steps:
        return (step + 1) / (config.warmup_steps + 1)
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps - 1)
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return config.min_lr_ratio + (1.0 - config.min_lr_ratio) * cosine


def data_sha256(examples: Sequence[Example]) -> str:
    """A stable digest of the training data, for a layer's provenance."""
    return hashlib.sha256(msgspec.json.encode(list(examples))).hexdigest()


def batch_indices(step: int, count: int, config: TrainingConfig, lengths: Sequence[int] | None = None) -> list[int]:
    """Which examples 0-based `step` trains on: a fresh seeded shuffle every pass over the data,
    sorted by length within windows of `BUCKET_BATCHES` batches when `lengths` are given."""
    return BatchOrder(count, config, lengths).indices(step)


class BatchOrder:
    """`batch_indices` for every step of one run, each pass's order computed once."""

    def __init__(self, count: int, config: TrainingConfig, lengths: Sequence[int] | None = None) -> None:
        self.count, self.config, self.lengths = count, config, lengths
        self._passes: dict[int, list[int]] = {}

    def indices(self, step: int) -> list[int]:
        start = step * self.config.batch_size
        return [self._order(epoch)[offset]
                for epoch, offset in (divmod(p, self.count) for p in range(start, start + self.config.batch_size))]

    def _order(self, epoch: int) -> list[int]:
        if epoch not in self._passes:
            if len(self._passes) > 2:
                self._passes.clear()  # a batch spans at most two passes
            order = [int(i) for i in np.random.default_rng([self.config.seed, epoch]).permutation(self.count)]
            if self.lengths is not None:
                window, lengths = self.config.batch_size * BUCKET_BATCHES, self.lengths
                # Stable sort: rows of one length keep their shuffled order.
                order = [i for at in range(0, self.count, window) for i in sorted(order[at : at + window], key=lengths.__getitem__)]
            self._passes[epoch] = order
        return self._passes[epoch]


def tokenize(tokenizer: Any, examples: Sequence[Example], max_length: int) -> list[Row]:
    """(input ids, labels) per example: labels are IGNORE over the prompt, the ids over the answer."""
    encoded = []
    for number, example in enumerate(examples):
        messages = [msgspec.structs.asdict(m) for m in example.messages]
        if len(messages) < 2 or messages[-1]["role"] != "assistant":
            raise ValueError(f"example {number}: expected a prompt then a last assistant message")
        prompt = _ids(tokenizer.apply_chat_template(messages[:-1], add_generation_prompt=True, tokenize=True))
        full = _ids(tokenizer.apply_chat_template(messages, tokenize=True))
        if full[: len(prompt)] != prompt:
            raise ValueError(f"example {number}: the chat template does not extend the prompt with the answer")
        full = full[:max_length]
        labels = [IGNORE] * min(len(prompt), len(full)) + full[len(prompt) :]
        if all(label == IGNORE for label in labels[1:]):
            raise ValueError(f"example {number}: no answer tokens fit in max_length {max_length}")
        encoded.append((full, labels))
    return encoded


def _ids(value: Any) -> list[int]:
    # transformers 5 returns a BatchEncoding from apply_chat_template(tokenize=True).
    ids = value["input_ids"] if not isinstance(value, list) else value
    return list(ids)


def target_count(labels: Sequence[int]) -> int:
    """The tokens a row is scored on: position t predicts t + 1, so the first label is never a target."""
    return sum(1 for label in labels[1:] if label != IGNORE)


def pad_id(tokenizer: Any) -> int:
    """The id batches are right-padded with (never a target, so any id would do; eos when there is no pad)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


# --- checkpoints --------------------------------------------------------------------------


def latest_checkpoint(checkpoint_dir: Path) -> Path | None:
    """The newest complete checkpoint folder (they are renamed into place whole), or None."""
    if not checkpoint_dir.is_dir():
        return None
    found = [p for p in checkpoint_dir.iterdir() if p.name.startswith(CHECKPOINT_PREFIX) and p.is_dir()]
    return max(found, key=lambda p: int(p.name.removeprefix(CHECKPOINT_PREFIX)), default=None)


def save_checkpoint(directory: Path, step: int, backend: TrainerBackend, losses: list[float], tokens: int) -> Path:
    """Write the backend's weights and optimizer state with the loop's (step, losses, tokens)."""
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / f"{CHECKPOINT_PREFIX}{step:08d}"
    partial = directory / f".partial-{step:08d}-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir()
    backend.save(partial)
    (partial / STATE_FILE).write_text(json.dumps({"step": step, "losses": losses, "tokens": tokens}))
    # A folder appears under its final name only when every file in it is written: a crash
    # mid-save leaves a .partial folder that the next run ignores (and overwrites).
    shutil.rmtree(final, ignore_errors=True)
    os.replace(partial, final)
    return final


def load_checkpoint(folder: Path, backend: TrainerBackend) -> tuple[int, list[float], int]:
    """Restore the backend from `folder`; (steps done, their losses, target tokens seen)."""
    backend.load(folder)
    state = json.loads((folder / STATE_FILE).read_text())
    return int(state["step"]), [float(x) for x in state["losses"]], int(state["tokens"])

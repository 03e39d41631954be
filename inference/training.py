"""LoRA training on PyTorch + PEFT (CUDA, ROCm, MPS or CPU): chat examples in, PEFT adapter files out.

    result = train_lora(model_folder, examples, TrainingConfig(steps=200), checkpoint_dir=dir)
    result.files  # adapter_model.safetensors + adapter_config.json, accepted by parse_adapter

The loss is next-token cross-entropy on the assistant turn only (the prompt is context,
not a target). The learning rate warms up linearly, then follows a cosine to
`min_lr_ratio` of its peak. The batch of step s depends only on (seed, s), so a run
resumed from a checkpoint (adapter + optimizer + step) sees the same batches as one
that never stopped and ends with the same adapter.

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
from typing import Any

import msgspec
import numpy as np

from inference.backends.base import ChatMessage, never_cancelled
from inference.lora.adapter import Canonical, peft_files
from inference.models import PROJECTIONS

IGNORE = -100  # the label cross-entropy skips: prompt and padding positions
CHECKPOINT_PREFIX = "step-"


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


class TrainingResult(msgspec.Struct, frozen=True):
    canonical: Canonical
    files: dict[str, bytes]  # PEFT layout
    losses: tuple[float, ...]  # every step's loss, including those before a resume
    steps: int
    tokens: int
    seconds: float
    resumed_from: int  # 0 when the run started from scratch


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


def batch_indices(step: int, count: int, config: TrainingConfig) -> list[int]:
    """Which examples 0-based `step` trains on: a fresh seeded shuffle every pass over the data."""
    start = step * config.batch_size
    indices = []
    for position in range(start, start + config.batch_size):
        epoch, offset = divmod(position, count)
        order = np.random.default_rng([config.seed, epoch]).permutation(count)
        indices.append(int(order[offset]))
    return indices


def latest_checkpoint(checkpoint_dir: Path) -> Path | None:
    """The newest complete checkpoint folder (they are renamed into place whole), or None."""
    if not checkpoint_dir.is_dir():
        return None
    found = [p for p in checkpoint_dir.iterdir() if p.name.startswith(CHECKPOINT_PREFIX) and p.is_dir()]
    return max(found, key=lambda p: int(p.name.removeprefix(CHECKPOINT_PREFIX)), default=None)


def tokenize(tokenizer: Any, examples: Sequence[Example], max_length: int) -> list[tuple[list[int], list[int]]]:
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


def collate(rows: Sequence[tuple[list[int], list[int]]], pad_id: int) -> dict[str, Any]:
    """Right-padded input ids, attention mask and labels as tensors."""
    import torch

    width = max(len(ids) for ids, _ in rows)
    ids = [row + [pad_id] * (width - len(row)) for row, _ in rows]
    labels = [row + [IGNORE] * (width - len(row)) for _, row in rows]
    mask = [[1] * len(row) + [0] * (width - len(row)) for row, _ in rows]
    return {
        "input_ids": torch.tensor(ids),
        "attention_mask": torch.tensor(mask),
        "labels": torch.tensor(labels),
    }


def load_for_training(model_folder: Path, config: TrainingConfig) -> tuple[Any, Any, str]:
    """(PEFT-wrapped model with fresh LoRA factors, tokenizer, device); seeded, so repeatable."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from inference.backends.torch import pick_device

    device = pick_device(config.device)
    tokenizer = AutoTokenizer.from_pretrained(model_folder)
    # fp32 master weights everywhere: the factors are small, and half precision Adam
    # updates on them lose the small steps late in the cosine schedule.
    model = AutoModelForCausalLM.from_pretrained(model_folder, dtype=torch.float32)
    torch.manual_seed(config.seed)  # PEFT draws lora_A from torch's generator
    lora = LoraConfig(
        r=config.rank,
        lora_alpha=config.alpha,
        target_modules=list(config.target_modules),
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, lora).to(device)
    model.train()
    return model, tokenizer, device


def train_lora(
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
    """Train a LoRA adapter on `examples`; resume from the newest checkpoint in `checkpoint_dir`.

    `on_progress` gets every `progress_every`-th step and the last one; `on_checkpoint`
    gets (step, folder) after each checkpoint is complete on disk. Raises
    `TrainingDiverged` on a non-finite loss and `TrainingCancelled` when `cancelled()`.
    """
    import torch

    if not examples:
        raise ValueError("examples: expected at least one, got none")
    if progress_every < 1:
        raise ValueError(f"progress_every: expected at least 1, got {progress_every}")
    model, tokenizer, device = load_for_training(Path(model_folder), config)
    rows = tokenize(tokenizer, examples, config.max_length)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, config))
    losses: list[float] = []
    tokens = 0
    start_step = 0
    checkpoint = latest_checkpoint(checkpoint_dir) if checkpoint_dir is not None else None
    if checkpoint is not None:
        start_step, losses, tokens = _load_checkpoint(checkpoint, model, optimizer, scheduler, device)
    started = time.perf_counter()
    for step in range(start_step, config.steps):
        if cancelled():
            raise TrainingCancelled(step)
        picked = [rows[i] for i in batch_indices(step, len(rows), config)]
        batch = {name: tensor.to(device) for name, tensor in collate(picked, pad_id).items()}
        learning_rate = scheduler.get_last_lr()[0]
        loss = model(**batch).loss
        value = loss.item()
        if not math.isfinite(value):
            raise TrainingDiverged(step + 1, value)
        loss.backward()
        if config.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(value)
        # Targets are the labels after the shift inside the model: one fewer per row.
        tokens += int((batch["labels"][:, 1:] != IGNORE).sum())
        done = step + 1
        if on_progress is not None and (done % progress_every == 0 or done == config.steps):
            on_progress(Progress(done, value, learning_rate, tokens, time.perf_counter() - started))
        # The last step is checkpointed too: a run resumed after it goes straight to the result.
        if checkpoint_dir is not None and checkpoint_every > 0 and (done % checkpoint_every == 0 or done == config.steps):
            folder = _save_checkpoint(Path(checkpoint_dir), done, model, optimizer, scheduler, losses, tokens)
            if on_checkpoint is not None:
                on_checkpoint(done, folder)
    canonical = lora_factors(model, config.rank)
    files = peft_files(canonical, config.rank, config.alpha, config.target_modules, base_model)
    return TrainingResult(
        canonical=canonical,
        files=files,
        losses=tuple(losses),
        steps=config.steps,
        tokens=tokens,
        seconds=time.perf_counter() - started,
        resumed_from=start_step,
    )


def lora_factors(model: Any, rank: int) -> Canonical:
    """The trained factors in canonical form: "layers.{i}.{module}" -> (A (r, in), B (out, r))."""
    factors: Canonical = {}
    for index, block in enumerate(model.base_model.model.model.layers):
        for module in PROJECTIONS:
            parent = block.self_attn if module in ("q_proj", "k_proj", "v_proj", "o_proj") else block.mlp
            layer = getattr(parent, module)
            if not hasattr(layer, "lora_A"):
                continue
            a = layer.lora_A["default"].weight.detach().float().cpu().numpy()
            b = layer.lora_B["default"].weight.detach().float().cpu().numpy()
            assert a.shape[0] == rank, f"layers.{index}.{module}: rank {a.shape[0]}, expected {rank}"
            factors[f"layers.{index}.{module}"] = (a.copy(), b.copy())
    return factors


# --- checkpoints --------------------------------------------------------------------------


def _save_checkpoint(
    directory: Path, step: int, model: Any, optimizer: Any, scheduler: Any, losses: list[float], tokens: int
) -> Path:
    import safetensors.torch
    import torch

    directory.mkdir(parents=True, exist_ok=True)
    final = directory / f"{CHECKPOINT_PREFIX}{step:08d}"
    partial = directory / f".partial-{step:08d}-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir()
    trainable = {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}
    safetensors.torch.save_file(trainable, str(partial / "adapter.safetensors"))
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, partial / "optimizer.pt")
    (partial / "state.json").write_text(json.dumps({"step": step, "losses": losses, "tokens": tokens}))
    # A folder appears under its final name only when every file in it is written: a crash
    # mid-save leaves a .partial folder that the next run ignores (and overwrites).
    shutil.rmtree(final, ignore_errors=True)
    os.replace(partial, final)
    return final


def _load_checkpoint(
    folder: Path, model: Any, optimizer: Any, scheduler: Any, device: str
) -> tuple[int, list[float], int]:
    import safetensors.torch
    import torch

    weights = safetensors.torch.load_file(str(folder / "adapter.safetensors"), device=device)
    named = dict(model.named_parameters())
    differing = {n for n, p in named.items() if p.requires_grad} ^ set(weights)
    if differing:
        raise TrainingError(f"{folder}: expected a checkpoint of this model and config, got other tensors "
                            f"({sorted(differing)[:3]})")
    with torch.no_grad():
        for name, tensor in weights.items():
            named[name].copy_(tensor)
    # weights_only: the file is ours, but nothing but tensors and numbers should load from it.
    saved = torch.load(folder / "optimizer.pt", map_location=device, weights_only=True)
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    state = json.loads((folder / "state.json").read_text())
    return int(state["step"]), [float(x) for x in state["losses"]], int(state["tokens"])

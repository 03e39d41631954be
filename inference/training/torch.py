"""LoRA training on PyTorch + PEFT (CUDA, ROCm, MPS or CPU): chat examples in, PEFT adapter files out.

    result = train_lora(model_folder, examples, TrainingConfig(steps=200), checkpoint_dir=dir)
    result.files  # adapter_model.safetensors + adapter_config.json, accepted by parse_adapter

The loop is `inference.training.loop.train`; this module is its torch step, checkpoint files
and factors. fp32 master weights, AdamW on the LoRA factors, gradients clipped to max_grad_norm.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Unpack

from inference.lora.adapter import Canonical, peft_files
from inference.models import PROJECTIONS
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
OPTIMIZER_FILE = "optimizer.pt"


def train_lora(
    model_folder: Path, examples: Sequence[Example], config: TrainingConfig, **options: Unpack[TrainingOptions]
) -> TrainingResult:
    """Train a PEFT LoRA adapter on `examples` with torch; the options are those of `loop.train`."""
    return train(TorchTrainer, model_folder, examples, config, **options)


class TorchTrainer:
    """A PEFT-wrapped causal LM with fresh LoRA factors and its AdamW: the loop's torch backend."""

    def __init__(self, model_folder: Path, config: TrainingConfig) -> None:
        import torch

        self.model, self.tokenizer, self.device = load_for_training(model_folder, config)
        self.config = config
        self.pad_id = pad_id(self.tokenizer)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=config.learning_rate, weight_decay=config.weight_decay)
        self.pending: Any = None  # the last loss tensor, until `update` backpropagates it

    def loss(self, batch: Sequence[Row]) -> float:
        tensors = {name: tensor.to(self.device) for name, tensor in collate(batch, self.pad_id).items()}
        self.pending = self.model(**tensors).loss
        return float(self.pending.item())

    def evaluate(self, batch: Sequence[Row]) -> tuple[float, int, int]:
        import torch

        tensors = {name: tensor.to(self.device) for name, tensor in collate(batch, self.pad_id).items()}
        with torch.no_grad():
            logits = self.model(input_ids=tensors["input_ids"], attention_mask=tensors["attention_mask"]).logits
        # Position t predicts the token at t + 1.
        logits, labels = logits[:, :-1].float(), tensors["labels"][:, 1:]
        scored = labels != IGNORE
        loss = torch.nn.functional.cross_entropy(logits[scored], labels[scored], reduction="sum")
        correct = int((logits[scored].argmax(-1) == labels[scored]).sum())
        return float(loss), correct, int(scored.sum())

    def update(self, learning_rate: float) -> None:
        import torch

        for group in self.optimizer.param_groups:
            group["lr"] = learning_rate
        self.pending.backward()
        if self.config.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.config.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.pending = None

    def save(self, folder: Path) -> None:
        import safetensors.torch
        import torch

        trainable = {n: p.detach().cpu().contiguous() for n, p in self.model.named_parameters() if p.requires_grad}
        safetensors.torch.save_file(trainable, str(folder / ADAPTER_FILE))
        torch.save({"optimizer": self.optimizer.state_dict()}, folder / OPTIMIZER_FILE)

    def load(self, folder: Path) -> None:
        import safetensors.torch
        import torch

        weights = safetensors.torch.load_file(str(folder / ADAPTER_FILE), device=self.device)
        named = dict(self.model.named_parameters())
        differing = {n for n, p in named.items() if p.requires_grad} ^ set(weights)
        if differing:
            raise TrainingError(f"{folder}: expected a checkpoint of this model and config, got other tensors "
                                f"({sorted(differing)[:3]})")
        with torch.no_grad():
            for name, tensor in weights.items():
                named[name].copy_(tensor)
        # weights_only: the file is ours, but nothing but tensors and numbers should load from it.
        saved = torch.load(folder / OPTIMIZER_FILE, map_location=self.device, weights_only=True)
        self.optimizer.load_state_dict(saved["optimizer"])

    def factors(self) -> Canonical:
        return lora_factors(self.model, self.config.rank)

    def files(self, canonical: Canonical, base_model: str | None) -> dict[str, bytes]:
        return peft_files(canonical, self.config.rank, self.config.alpha, self.config.target_modules, base_model)


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


def collate(rows: Sequence[Row], pad_id: int) -> dict[str, Any]:
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

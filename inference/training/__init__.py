"""LoRA training: one loop (`loop`), a backend per tensor library (`torch`, `mlx`).

The names callers use live here; importing the package loads neither torch nor mlx (the
backends import them inside their functions). `torch.py` and `mlx.py` are named like the
libraries they drive: their absolute `import torch` and `import mlx.core` still reach the
top-level packages, as long as nothing puts this folder itself on sys.path.
"""

from inference.training.loop import (
    IGNORE,
    BatchOrder,
    Evaluation,
    Example,
    Progress,
    TrainerBackend,
    TrainingCancelled,
    TrainingConfig,
    TrainingDiverged,
    TrainingError,
    TrainingResult,
    batch_indices,
    data_sha256,
    latest_checkpoint,
    lr_factor,
    tokenize,
)
from inference.training.torch import train_lora

__all__ = [
    "IGNORE",
    "BatchOrder",
    "Evaluation",
    "Example",
    "Progress",
    "TrainerBackend",
    "TrainingCancelled",
    "TrainingConfig",
    "TrainingDiverged",
    "TrainingError",
    "TrainingResult",
    "batch_indices",
    "data_sha256",
    "latest_checkpoint",
    "lr_factor",
    "tokenize",
    "train_lora",
]

"""The training package stays light to import, and its backend modules named like the libraries still reach them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

PROJECT_ROOT = Path(__file__).resolve().parents[2]


def _run(code: str) -> str:
    # A fresh interpreter: this test session may have imported torch or mlx already.
    done = subprocess.run([sys.executable, "-c", code], cwd=PROJECT_ROOT, check=True, capture_output=True, text=True)
    return done.stdout.strip()


def test_importing_the_training_package_and_its_backends_loads_neither_torch_nor_mlx() -> None:
    loaded = _run(
        "import sys, inference.training, inference.training.torch, inference.training.mlx\n"
        "print(sorted(m for m in ('torch', 'mlx', 'transformers', 'peft', 'mlx_lm') if m in sys.modules))"
    )

    assert loaded == "[]"


def test_the_torch_backend_module_imports_the_real_torch_not_itself() -> None:
    made = _run(
        "from inference.training.torch import collate\n"
        "batch = collate([([5, 6, 7], [-100, 6, 7]), ([5, 6], [-100, 6])], pad_id=0)\n"
        "print(type(batch['input_ids']).__module__, batch['labels'].tolist())"
    )

    assert made == "torch [[-100, 6, 7], [-100, 6, -100]]"


def test_the_mlx_backend_module_imports_the_real_mlx_not_itself() -> None:
    pytest.importorskip("mlx.core")
    made = _run(
        "from inference.training.mlx import collate_mlx\n"
        "ids, bounds = collate_mlx([([5, 6, 7], [-100, 6, 7]), ([5, 6], [-100, 6])], pad_id=0)\n"
        "print(type(ids).__module__, ids.tolist(), bounds.tolist())"
    )

    assert made == "mlx.core [[5, 6, 7], [5, 6, 0]] [[1, 2], [1, 1]]"

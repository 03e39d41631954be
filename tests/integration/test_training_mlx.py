"""LoRA training on MLX (mlx-lm's tuner) on the tiny random Llama: the torch trainer's contract,
an adapter in the mlx-lm layout that loads and changes the output, exact resume, NaN and cancel."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy

from fixtures.make_model import TINY_MODEL, make_tiny_llama, tiny_spec
from inference.backends.base import ChatMessage
from inference.lora.adapter import parse_adapter, to_canonical
from inference.lora.stack import assemble
from inference.training import (
    Example,
    Progress,
    TrainingCancelled,
    TrainingConfig,
    TrainingDiverged,
    latest_checkpoint,
    lr_factor,
)

pytest.importorskip("mlx_lm")

from inference.backends.mlx import MlxBackend  # noqa: E402
from inference.training.mlx import train_lora_mlx  # noqa: E402

EXAMPLES = [
    Example(
        (
            ChatMessage("system", "You answer in one short sentence."),
            ChatMessage("user", f"What is {i} plus {i}?"),
            ChatMessage("assistant", f"The answer is {2 * i}."),
        )
    )
    for i in range(12)
]
CONFIG = TrainingConfig(steps=24, batch_size=4, learning_rate=1e-2, warmup_steps=2, seed=3)


def test_mlx_training_lowers_the_loss_and_yields_an_mlx_lm_adapter_that_changes_the_output(tiny_model: Path) -> None:
    seen: list[Progress] = []

    result = train_lora_mlx(tiny_model, EXAMPLES, CONFIG, base_model=TINY_MODEL, on_progress=seen.append,
                            progress_every=10)

    first, last = np.mean(result.losses[:4]), np.mean(result.losses[-4:])
    assert last < 0.8 * first, (first, last)
    assert [p.step for p in seen] == [10, 20, 24]
    assert [p.learning_rate for p in seen] == pytest.approx([1e-2 * lr_factor(s - 1, CONFIG) for s in (10, 20, 24)])
    info = parse_adapter(result.files, tiny_spec(tiny_model), max_rank=64)
    assert (info.format, info.rank, info.target_modules, info.scale) == ("mlx", 8, ("q_proj", "v_proj"), 2.0)
    backend = MlxBackend(tiny_model)
    ids = backend.encode_chat([ChatMessage("user", "What is 3 plus 3?")])
    stack = assemble([("trained", 1.0, to_canonical(result.files, info), info.scale)])
    assert not np.allclose(backend.logits(ids, None), backend.logits(ids, stack), atol=1e-3)
    assert result.tokens > 0 and result.steps == CONFIG.steps and result.resumed_from == 0


def test_mlx_training_scores_the_same_tokens_as_the_torch_trainer(tiny_model: Path) -> None:
    from inference.training import train_lora

    one = TrainingConfig(steps=1, batch_size=4, seed=3, device="cpu")
    # Before any update both score the base model on the same answer tokens: the same loss.
    assert train_lora_mlx(tiny_model, EXAMPLES, one).losses == pytest.approx(
        train_lora(tiny_model, EXAMPLES, one).losses, rel=1e-4)


def test_a_non_finite_loss_stops_mlx_training_with_the_step(tmp_path: Path) -> None:
    folder = make_tiny_llama(tmp_path / "broken")
    weights = safetensors.numpy.load_file(str(folder / "model.safetensors"))
    weights["model.norm.weight"][0] = np.nan
    safetensors.numpy.save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})

    with pytest.raises(TrainingDiverged) as caught:
        train_lora_mlx(folder, EXAMPLES, CONFIG)

    assert caught.value.step == 1 and math.isnan(caught.value.loss)


def test_resuming_mlx_training_from_a_checkpoint_ends_with_the_same_adapter_as_an_unbroken_run(
    tiny_model: Path, tmp_path: Path
) -> None:
    unbroken = train_lora_mlx(tiny_model, EXAMPLES, CONFIG)
    steps_seen: list[int] = []
    checkpoints: list[int] = []

    with pytest.raises(TrainingCancelled) as caught:
        train_lora_mlx(
            tiny_model, EXAMPLES, CONFIG, checkpoint_dir=tmp_path, checkpoint_every=5,
            on_progress=lambda p: steps_seen.append(p.step), on_checkpoint=lambda step, _: checkpoints.append(step),
            cancelled=lambda: len(steps_seen) >= 13,
        )
    assert caught.value.step == 13 and checkpoints == [5, 10]
    assert latest_checkpoint(tmp_path) == tmp_path / "step-00000010"

    resumed_steps: list[int] = []
    resumed = train_lora_mlx(tiny_model, EXAMPLES, CONFIG, checkpoint_dir=tmp_path, checkpoint_every=5,
                             on_progress=lambda p: resumed_steps.append(p.step))

    assert resumed.resumed_from == 10 and resumed_steps[0] == 11
    assert resumed.losses == pytest.approx(unbroken.losses, rel=1e-4)
    for key, (a, b) in unbroken.canonical.items():
        np.testing.assert_allclose(resumed.canonical[key][0], a, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(resumed.canonical[key][1], b, rtol=1e-4, atol=1e-6)

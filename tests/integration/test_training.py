"""LoRA training on the tiny random Llama: loss falls, output changes, NaN and cancel stop it, resume is exact."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy

from fixtures.make_model import TINY_MODEL, make_tiny_llama, tiny_spec
from inference.backends.base import ChatMessage
from inference.backends.torch import TorchBackend
from inference.lora.adapter import parse_adapter, to_canonical
from inference.lora.stack import assemble
from inference.training import (
    Example,
    Progress,
    TrainingCancelled,
    TrainingConfig,
    TrainingDiverged,
    data_sha256,
    latest_checkpoint,
    lr_factor,
    train_lora,
)

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
# A high rate: the tiny random model must learn visibly within a few dozen steps.
CONFIG = TrainingConfig(steps=24, batch_size=4, learning_rate=1e-2, warmup_steps=2, seed=3)


def test_training_lowers_the_loss_and_yields_an_adapter_that_changes_the_output(tiny_model: Path) -> None:
    result = train_lora(tiny_model, EXAMPLES, CONFIG, base_model=TINY_MODEL)

    first, last = np.mean(result.losses[:4]), np.mean(result.losses[-4:])
    assert last < 0.8 * first, (first, last)
    info = parse_adapter(result.files, tiny_spec(tiny_model), max_rank=64)
    assert (info.format, info.rank, info.target_modules, info.scale) == ("peft", 8, ("q_proj", "v_proj"), 2.0)
    backend = TorchBackend(tiny_model, device="cpu")
    ids = backend.encode_chat([ChatMessage("user", "What is 3 plus 3?")])
    stack = assemble([("trained", 1.0, to_canonical(result.files, info), info.scale)])
    assert not np.allclose(backend.logits(ids, None), backend.logits(ids, stack), atol=1e-3)
    assert result.tokens > 0 and result.steps == CONFIG.steps and result.resumed_from == 0


def test_progress_comes_every_n_steps_with_the_warmup_then_cosine_rate(tiny_model: Path) -> None:
    seen: list[Progress] = []
    config = TrainingConfig(steps=10, batch_size=2, learning_rate=1e-3, warmup_steps=3, min_lr_ratio=0.1)

    train_lora(tiny_model, EXAMPLES, config, on_progress=seen.append, progress_every=4)

    assert [p.step for p in seen] == [4, 8, 10]  # every 4th, and always the last
    assert [p.learning_rate for p in seen] == pytest.approx([1e-3 * lr_factor(s - 1, config) for s in (4, 8, 10)])
    assert lr_factor(0, config) == pytest.approx(0.25) and lr_factor(3, config) == pytest.approx(1.0)
    assert lr_factor(9, config) == pytest.approx(0.1)
    assert all(math.isfinite(p.loss) for p in seen) and seen[-1].tokens > seen[0].tokens


def test_a_non_finite_loss_stops_training_with_the_step(tmp_path: Path) -> None:
    # A real model file with one corrupt weight: every forward pass gives a NaN loss.
    folder = make_tiny_llama(tmp_path / "broken")
    weights = safetensors.numpy.load_file(str(folder / "model.safetensors"))
    weights["model.norm.weight"][0] = np.nan
    safetensors.numpy.save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    seen: list[Progress] = []

    with pytest.raises(TrainingDiverged) as caught:
        train_lora(folder, EXAMPLES, CONFIG, on_progress=seen.append)

    assert caught.value.step == 1 and math.isnan(caught.value.loss) and seen == []
    assert "training stopped at step 1: the loss is nan" in str(caught.value)


def test_resuming_from_a_checkpoint_ends_with_the_same_adapter_as_an_unbroken_run(
    tiny_model: Path, tmp_path: Path
) -> None:
    unbroken = train_lora(tiny_model, EXAMPLES, CONFIG)
    steps_seen: list[int] = []
    checkpoints: list[int] = []

    with pytest.raises(TrainingCancelled) as caught:
        train_lora(
            tiny_model,
            EXAMPLES,
            CONFIG,
            checkpoint_dir=tmp_path,
            checkpoint_every=5,
            on_progress=lambda p: steps_seen.append(p.step),
            on_checkpoint=lambda step, _: checkpoints.append(step),
            cancelled=lambda: len(steps_seen) >= 13,
        )
    assert caught.value.step == 13 and checkpoints == [5, 10]
    assert latest_checkpoint(tmp_path) == tmp_path / "step-00000010"

    resumed_steps: list[int] = []
    resumed = train_lora(
        tiny_model, EXAMPLES, CONFIG, checkpoint_dir=tmp_path, checkpoint_every=5,
        on_progress=lambda p: resumed_steps.append(p.step),
    )

    assert resumed.resumed_from == 10 and resumed_steps[0] == 11  # steps 1..10 are not run again
    assert resumed.losses == pytest.approx(unbroken.losses, rel=1e-4)
    for key, (a, b) in unbroken.canonical.items():
        np.testing.assert_allclose(resumed.canonical[key][0], a, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(resumed.canonical[key][1], b, rtol=1e-4, atol=1e-6)


def test_examples_without_a_final_answer_and_bad_settings_are_refused(tiny_model: Path) -> None:
    no_answer = [Example((ChatMessage("user", "hello?"),))]
    with pytest.raises(ValueError, match="example 0: expected a prompt then a last assistant message"):
        train_lora(tiny_model, no_answer, CONFIG)
    with pytest.raises(ValueError, match="examples: expected at least one"):
        train_lora(tiny_model, [], CONFIG)
    with pytest.raises(ValueError, match="warmup_steps: expected 0..steps-1, got 5"):
        TrainingConfig(steps=5, warmup_steps=5)
    with pytest.raises(ValueError, match="target_modules"):
        TrainingConfig(target_modules=("lm_head",))


def test_the_data_digest_names_the_examples_and_their_order() -> None:
    assert data_sha256(EXAMPLES) == data_sha256(list(EXAMPLES))
    assert data_sha256(EXAMPLES) != data_sha256(EXAMPLES[::-1])

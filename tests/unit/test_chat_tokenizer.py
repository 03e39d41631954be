"""Prompt token counts without transformers agree with transformers' own, on both test models."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from inference.backends.base import ChatMessage
from inference.models import declared_weight_bytes
from inference.tokens import ChatTokenizer

CHATS = (
    [ChatMessage("user", "hi there")],
    [ChatMessage("system", "You are a pirate."), ChatMessage("user", "Où est le trésor? 🏴‍☠️"),
     ChatMessage("assistant", "Arr, {{ not a template }}"), ChatMessage("user", "again\n\n  with spaces ")],
)


@pytest.mark.parametrize("which", ["default_model", "tiny_model"])
def test_counts_match_the_model_tokenizer_and_chat_template(which: str, request: pytest.FixtureRequest) -> None:
    from transformers import AutoTokenizer

    folder: Path = request.getfixturevalue(which)
    reference, ours = AutoTokenizer.from_pretrained(folder), ChatTokenizer(folder)
    for chat in CHATS:
        text = reference.apply_chat_template([{"role": m.role, "content": m.content} for m in chat],
                                             add_generation_prompt=True, tokenize=False)
        assert ours.prompt_text(chat) == text
        assert ours.count_prompt(chat) == len(reference.encode(text, add_special_tokens=False))


def test_declared_weight_bytes_count_every_parameter_once(tiny_model: Path) -> None:
    config = json.loads((tiny_model / "config.json").read_text())
    hidden, inter, layers, vocab = (config[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "vocab_size"))
    kv = config["num_key_value_heads"] * config["head_dim"]
    per_layer = 2 * hidden * hidden + 2 * hidden * kv + 3 * hidden * inter + 2 * hidden  # q o, k v, mlp, two norms
    parameters = 2 * vocab * hidden + layers * per_layer + hidden  # embeddings and untied head, final norm
    assert declared_weight_bytes(tiny_model, 4) == 4 * parameters
    assert declared_weight_bytes(tiny_model, 2) == 2 * parameters

"""The tiny random Llama fixture loads, and computes the same thing, in transformers and mlx-lm."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from fixtures.make_model import make_tiny_llama, tiny_spec

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def test_same_seed_writes_the_same_weights_and_another_seed_does_not(tiny_model: Path, tmp_path: Path) -> None:
    def digest(folder: Path) -> str:
        return hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()

    assert digest(make_tiny_llama(tmp_path / "again")) == digest(tiny_model)
    assert digest(make_tiny_llama(tmp_path / "other", seed=1)) != digest(tiny_model)


def test_spec_matches_the_config_and_the_tokenizer(tiny_model: Path) -> None:
    from transformers import AutoTokenizer

    spec = tiny_spec(tiny_model)
    assert (spec.hidden_size, spec.num_hidden_layers, spec.num_attention_heads, spec.num_key_value_heads) == (
        64,
        2,
        4,
        2,
    )
    assert spec.vocab_size == len(AutoTokenizer.from_pretrained(tiny_model))


def test_chat_template_renders_chatml_and_ends_turns_with_eos(tiny_model: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    text = tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=False)
    assert text == "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.eos_token_id in ids and tokenizer.decode(ids) == text


def test_transformers_and_mlx_lm_load_it_and_agree_on_logits(tiny_model: Path) -> None:
    import mlx.core as mx
    import mlx_lm
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ids = AutoTokenizer.from_pretrained(tiny_model).encode("The capital of France is")
    torch_model = AutoModelForCausalLM.from_pretrained(tiny_model)
    assert torch_model.dtype == torch.float32
    with torch.no_grad():
        expected = torch_model(torch.tensor([ids])).logits[0].numpy()
    mlx_model, mlx_tokenizer = mlx_lm.load(str(tiny_model))
    assert mlx_tokenizer.encode("The capital of France is") == ids
    got = np.array(mlx_model(mx.array([ids]))[0])
    # Spread-out logits: a wrong rope_theta or a dropped norm weight would show far above 1e-4.
    assert expected.std() > 0.5
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)

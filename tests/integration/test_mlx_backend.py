"""The mlx backend on the tiny random Llama: exact LoRA stacks, plain-mlx-lm parity and the guards."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from fixtures.make_adapter import random_canonical
from fixtures.make_model import tiny_spec
from inference.backends.base import ChatMessage, Finish, Sampling, Token
from inference.guards import RepetitionRule
from inference.lora.adapter import PARENTS, Canonical
from inference.lora.stack import LoraStack, StackLayer, assemble
from inference.models import SMOLLM2_135M_INSTRUCT, ModelSpec

pytest.importorskip("mlx_lm")

from inference.backends.base import StackMismatch  # noqa: E402
from inference.backends.mlx import MlxBackend  # noqa: E402

QUESTION = [ChatMessage("user", "What is the capital of France?")]
# "<|im_start|>user\nWhat is the capital of France?" in the tiny model's tokenizer.
IDS = [2, 87, 85, 267, 201, 333, 273, 281, 275, 270, 298, 33]


@pytest.fixture(scope="module")
def backend(tiny_model: Path) -> MlxBackend:
    return MlxBackend(tiny_model)


@pytest.fixture(scope="module")
def prompt_ids(tiny_model: Path) -> list[int]:
    """QUESTION through the chat template, by transformers."""
    from transformers import AutoTokenizer

    chat = [{"role": m.role, "content": m.content} for m in QUESTION]
    return AutoTokenizer.from_pretrained(tiny_model).apply_chat_template(chat, add_generation_prompt=True)["input_ids"]


@pytest.fixture(scope="module")
def prompt_tokens(prompt_ids: list[int]) -> int:
    return len(prompt_ids)


def test_the_prompt_is_the_chat_template_as_transformers_renders_it(backend: MlxBackend, prompt_ids: list[int]) -> None:
    assert backend.encode_chat(QUESTION) == prompt_ids
    assert prompt_ids[: len(IDS)] == IDS


def three_layers(model: Path) -> list[StackLayer]:
    """Three adapters of different ranks, modules and blocks; weights include a negative one."""
    spec = tiny_spec(model)
    return [
        ("layer-a", 0.7, random_canonical(spec, 4, ("q_proj", "v_proj"), (0, 1), seed=1), 2.0),
        ("layer-b", -0.4, random_canonical(spec, 8, ("v_proj", "down_proj"), (1,), seed=2), 0.5),
        ("layer-c", 1.5, random_canonical(spec, 2, ("o_proj", "gate_proj", "up_proj"), (0,), seed=3), 1.0),
    ]


def scaled(layers: list[StackLayer], factor: float) -> list[StackLayer]:
    """The same adapters with factors multiplied: random LoRA at std 0.02 barely moves logits."""
    # New ids: a stack's key (and so the backend's cache) names layers, not their contents.
    return [
        (f"{layer_id}*{factor}", weight, {k: (a * factor, b * factor) for k, (a, b) in canonical.items()}, scale)
        for layer_id, weight, canonical, scale in layers
    ]


def merged_mlx_logits(model: Path, layers: list[StackLayer], ids: list[int]) -> np.ndarray:
    """A fresh mlx-lm model with W += sum_i w_i s_i B_i A_i merged in (float64), one forward pass."""
    import mlx.core as mx
    import mlx_lm

    plain, _ = mlx_lm.load(str(model))
    weights = dict(_weights_after_merge(dict(_named_projection_weights(plain)), layers))
    plain.load_weights([(name, mx.array(w.astype(np.float32))) for name, w in weights.items()], strict=False)
    return np.array(plain(mx.array([ids]))[0])


def _named_projection_weights(mlx_model: object) -> Iterator[tuple[str, np.ndarray]]:
    from mlx.utils import tree_flatten

    for name, array in tree_flatten(mlx_model.parameters()):  # type: ignore[attr-defined]
        if name.rsplit(".", 2)[-2] in PARENTS and name.endswith(".weight"):
            yield name, np.array(array).astype(np.float64)


def _weights_after_merge(weights: dict[str, np.ndarray], layers: list[StackLayer]) -> dict[str, np.ndarray]:
    for _, weight, canonical, scale in layers:
        for key, (a, b) in canonical.items():
            _, block, module = key.split(".")
            name = f"model.layers.{block}.{PARENTS[module]}.{module}.weight"
            weights[name] = weights[name] + weight * scale * (b.astype(np.float64) @ a.astype(np.float64))
    return weights


def text_and_finish(events: Iterator[Token | Finish]) -> tuple[str, Finish]:
    items = list(events)
    assert all(isinstance(item, Token) for item in items[:-1])
    assert isinstance(items[-1], Finish)
    return "".join(item.text for item in items[:-1]), items[-1]  # type: ignore[union-attr]


# --- exactness ----------------------------------------------------------------------------


def test_stack_logits_equal_base_plus_each_adapter_merged_separately(backend: MlxBackend, tiny_model: Path) -> None:
    layers = scaled(three_layers(tiny_model), 10.0)
    got = backend.logits(IDS, assemble(layers))
    expected = merged_mlx_logits(tiny_model, layers, IDS)
    base = backend.logits(IDS, None)
    assert np.abs(got - base).max() > 0.1  # the stack really moves the logits
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)


def test_logits_without_a_stack_are_plain_mlx_lm(backend: MlxBackend, tiny_model: Path) -> None:
    got = backend.logits(IDS, None)
    assert got.shape == (len(IDS), tiny_spec(tiny_model).vocab_size) and got.dtype == np.float32
    # Computed floats: a tolerance far below what any layer moves (see the stack tests' > 0.1).
    np.testing.assert_allclose(got, merged_mlx_logits(tiny_model, [], IDS), atol=1e-5, rtol=0)


def test_switching_stacks_is_exact_both_ways_and_never_reloads(backend: MlxBackend, tiny_model: Path) -> None:
    layers = scaled(three_layers(tiny_model), 10.0)
    first, second = assemble(layers), assemble(layers[1:])
    base = backend.logits(IDS, None)
    with_first = backend.logits(IDS, first)
    with_second = backend.logits(IDS, second)
    assert np.abs(with_first - with_second).max() > 0.1
    np.testing.assert_allclose(backend.logits(IDS, first), with_first, atol=1e-5, rtol=0)
    backend.activate(second)  # what the engine does between requests
    np.testing.assert_allclose(backend.logits(IDS, None), base, atol=1e-5, rtol=0)
    assert backend.loads == 1


def test_mlx_and_torch_backends_agree_on_logits_with_a_stack(backend: MlxBackend, tiny_model: Path) -> None:
    from inference.backends.torch import TorchBackend

    torch_backend = TorchBackend(tiny_model, device="cpu")
    stack = assemble(scaled(three_layers(tiny_model), 10.0))
    for maybe_stack in (None, stack):
        got, expected = backend.logits(IDS, maybe_stack), torch_backend.logits(IDS, maybe_stack)
        np.testing.assert_allclose(got, expected, atol=1e-3, rtol=0)


# --- generation ---------------------------------------------------------------------------


def test_greedy_without_a_stack_generates_what_mlx_lm_generate_does(backend: MlxBackend, tiny_model: Path) -> None:
    import mlx_lm

    model, tokenizer = mlx_lm.load(str(tiny_model))
    chat = [{"role": m.role, "content": m.content} for m in QUESTION]
    prompt = tokenizer.apply_chat_template(chat, add_generation_prompt=True)
    expected = [r.token for r in mlx_lm.stream_generate(model, tokenizer, prompt, max_tokens=40)]
    events = list(backend.generate(QUESTION, None, Sampling(max_tokens=40)))
    # Tokens carry text, so ids that end inside a character arrive with the next one; and
    # mlx-lm's streaming detokenizer drops the answer's leading space, the full decode keeps it.
    text = "".join(t.text for t in events if isinstance(t, Token))
    assert text == tokenizer.decode(expected, skip_special_tokens=True)
    assert events[-1] == Finish("length", prompt_tokens=len(prompt), completion_tokens=40)


def test_greedy_with_a_stack_differs_and_is_repeatable(backend: MlxBackend, tiny_model: Path) -> None:
    stack = assemble(scaled(three_layers(tiny_model), 10.0))
    plain, _ = text_and_finish(backend.generate(QUESTION, None, Sampling(max_tokens=20)))
    once, _ = text_and_finish(backend.generate(QUESTION, stack, Sampling(max_tokens=20)))
    again, _ = text_and_finish(backend.generate(QUESTION, stack, Sampling(max_tokens=20)))
    assert once == again and once != plain


def test_a_worker_thread_generates_what_the_loading_thread_does(backend: MlxBackend) -> None:
    # The engine decodes on its own thread; mlx streams are per thread.
    from concurrent.futures import ThreadPoolExecutor

    def answer() -> tuple[str, Finish]:
        return text_and_finish(backend.generate(QUESTION, None, Sampling(max_tokens=20)))

    with ThreadPoolExecutor(max_workers=1) as worker:
        assert worker.submit(answer).result() == answer()


def test_a_prompt_that_repeats_the_last_ones_beginning_reuses_its_keys_and_values_exactly(tiny_model: Path) -> None:
    system = ChatMessage("system", "You are a helpful assistant. Answer the question briefly and truthfully.")
    chats = [[system, ChatMessage("user", question)] for question in ("Hello!", "What is the capital of Italy?")]
    stack = assemble(scaled(three_layers(tiny_model), 10.0))
    cached = MlxBackend(tiny_model)
    uncached = MlxBackend(tiny_model, prompt_cache_bytes=0)
    sampling = Sampling(max_tokens=10)

    def answer(backend: MlxBackend, chat: list[ChatMessage], layers: LoraStack | None) -> list[Token | Finish]:
        return list(backend.generate(chat, layers, sampling))

    for chat, layers in [(chats[0], stack), (chats[1], stack), (chats[1], None), (chats[0], None), (chats[0], stack)]:
        assert answer(cached, chat, layers) == answer(uncached, chat, layers)
    # The second chat under the stack reuses the shared system turn; the last repeats a whole prompt.
    assert cached.reused_tokens >= 2 * len(cached.encode_chat([system]))
    assert uncached.reused_tokens == 0

def test_a_seed_fixes_sampled_tokens_and_another_seed_changes_them(backend: MlxBackend) -> None:
    def sample(seed: int, top_p: float = 1.0) -> list[int]:
        sampling = Sampling(temperature=1.0, top_p=top_p, seed=seed, max_tokens=30)
        return [t.token_id for t in backend.generate(QUESTION, None, sampling) if isinstance(t, Token)]

    assert sample(7) == sample(7)
    assert sample(7) != sample(8)
    assert sample(7, top_p=0.3) == sample(7, top_p=0.3)


def test_stop_strings_end_the_answer_and_are_never_emitted(backend: MlxBackend) -> None:
    full, _ = text_and_finish(backend.generate(QUESTION, None, Sampling(max_tokens=40)))
    stop = full[10:13]
    text, finish = text_and_finish(backend.generate(QUESTION, None, Sampling(max_tokens=40, stop=(stop,))))
    assert finish.reason == "stop"
    assert text == full[: full.index(stop)] and stop not in text


def test_a_repetition_loop_ends_with_repetition(tiny_model: Path) -> None:
    # The tiny model's greedy answer to "Hello" repeats one token three times in a row.
    backend = MlxBackend(tiny_model, repetition=RepetitionRule(max_period=1, min_repeats=3, min_span=3))
    events = list(backend.generate([ChatMessage("user", "Hello")], None, Sampling(max_tokens=500)))
    finish = events[-1]
    assert isinstance(finish, Finish) and finish.reason == "repetition"
    assert len({t.token_id for t in events[-4:-1]}) == 1


def test_cancelling_stops_between_tokens(backend: MlxBackend, prompt_tokens: int) -> None:
    calls = iter(range(100))
    events = list(backend.generate(QUESTION, None, Sampling(max_tokens=100), cancelled=lambda: next(calls) >= 5))
    assert events[-1] == Finish("cancelled", prompt_tokens=prompt_tokens, completion_tokens=5)


def test_overflowing_stack_ends_with_an_error_finish(
    backend: MlxBackend, tiny_model: Path, prompt_tokens: int
) -> None:
    # Finite factors whose product overflows float32: the logits become NaN mid-model.
    huge = scaled(three_layers(tiny_model), 1e25)
    events = list(backend.generate(QUESTION, assemble(huge), Sampling(max_tokens=10)))
    assert events == [Finish("error", prompt_tokens, 0, "non-finite logits (NaN or Inf) at generated token 1")]


def test_a_prompt_past_the_context_ends_with_an_error_finish(backend: MlxBackend, prompt_tokens: int) -> None:
    events = list(backend.generate(QUESTION, None, Sampling(max_tokens=2048)))
    expected = f"prompt of {prompt_tokens} tokens plus max_tokens 2048 exceeds the model's context of 2048"
    assert events == [Finish("error", prompt_tokens, 0, expected)]


# --- refusals -----------------------------------------------------------------------------


def one_layer_stack(canonical: Canonical) -> LoraStack:
    return assemble([("bad", 1.0, canonical, 1.0)])


@pytest.mark.parametrize(
    ("canonical", "message"),
    [
        (lambda spec: random_canonical(spec, 2, ("q_proj",), (2,), seed=0), r"got 'layers\.2\.q_proj'"),
        (
            lambda spec: random_canonical(SMOLLM2_135M_INSTRUCT, 2, ("q_proj",), (0,), seed=0),
            r"layers\.0\.q_proj: expected A \(R, 64\) and B \(64, R\), got \(2, 576\) and \(576, 2\)",
        ),
        (lambda spec: random_canonical(spec, 2, ("q_proj",), (0,), seed=0, nan=True), "expected finite factors"),
    ],
    ids=["block out of range", "another model's shapes", "NaN"],
)
def test_bad_stacks_are_refused_before_generation(
    backend: MlxBackend, tiny_model: Path, canonical: Callable[[ModelSpec], Canonical], message: str
) -> None:
    stack = one_layer_stack(canonical(tiny_spec(tiny_model)))
    with pytest.raises(StackMismatch, match=message):
        backend.generate(QUESTION, stack, Sampling())
    with pytest.raises(StackMismatch, match=message):
        backend.logits(IDS, stack)


def test_empty_chats_and_out_of_vocabulary_ids_are_refused(backend: MlxBackend, tiny_model: Path) -> None:
    vocab = tiny_spec(tiny_model).vocab_size
    with pytest.raises(ValueError, match="expected at least one message"):
        backend.generate([], None, Sampling())
    with pytest.raises(ValueError, match=rf"expected ids in 0\.\.{vocab - 1}, got {vocab}"):
        backend.logits([1, vocab], None)


# --- the real default model ---------------------------------------------------------------


def test_the_default_model_answers_paris_greedily(default_model: Path) -> None:
    backend = MlxBackend(default_model)
    text, finish = text_and_finish(backend.generate(QUESTION, None, Sampling(max_tokens=40)))
    assert "Paris" in text
    assert finish.reason == "stop"

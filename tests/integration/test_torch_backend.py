"""The torch backend on a tiny random Llama (fp32): exact stacks, swaps without reloads, guards."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from fixtures.make_adapter import random_canonical
from fixtures.make_model import tiny_spec
from inference.backends.base import ChatMessage, Finish, Sampling, Token
from inference.backends.base import StackMismatch
from inference.backends.torch import TorchBackend, can_pack
from inference.engine import Engine
from inference.guards import RepetitionRule
from inference.lora.adapter import Canonical, mlx_files, parse_adapter, peft_files, to_canonical
from inference.lora.stack import LoraStack, StackLayer, assemble

QUESTION = [ChatMessage("user", "What is the capital of France?")]
_PROJECTION = re.compile(r"model\.layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)")


@pytest.fixture(scope="module")
def backend(tiny_model: Path) -> TorchBackend:
    return TorchBackend(tiny_model, device="cpu")


@pytest.fixture(scope="module")
def prompt(backend: TorchBackend) -> list[int]:
    return backend.encode_chat(QUESTION)


def three_layers(model: Path, seed: int = 0) -> list[StackLayer]:
    """Three adapters of different ranks, modules and scales, as a persona's genome would stack them."""
    spec = tiny_spec(model)
    # Layer ids name the adapters (a stack's cache key is built from them), so new seeds get new ids.
    return [
        (f"style-{seed}", 1.0, random_canonical(spec, 2, ("q_proj", "v_proj"), (0, 1), seed + 1), 2.0),
        (f"facts-{seed}", 0.5, random_canonical(spec, 4, ("q_proj", "o_proj", "down_proj"), (1,), seed + 2), 1.5),
        (f"tone-{seed}", 0.25, random_canonical(spec, 8, ("gate_proj", "up_proj", "k_proj"), (0,), seed + 3), 4.0),
    ]


def scaled(layers: list[StackLayer], factor: float) -> list[StackLayer]:
    """The same layers with every factor multiplied, so the adapters move the logits visibly."""
    return [(i, w, {k: (a * factor, b * factor) for k, (a, b) in c.items()}, s) for i, w, c, s in layers]


def plain_model(model: Path):  # type: ignore[no-untyped-def]
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()


def logits_with_separate_adapters(model: Path, layers: list[StackLayer], ids: list[int]) -> np.ndarray:
    """Plain transformers, each adapter's w*s*B(Ax) added on its own by a forward hook."""
    reference = plain_model(model)
    for name, module in reference.named_modules():
        match = _PROJECTION.fullmatch(name)
        if match is None:
            continue
        key = f"layers.{match[1]}.{match[2]}"
        deltas = [(w * s, torch.from_numpy(c[key][0]), torch.from_numpy(c[key][1])) for _, w, c, s in layers if key in c]
        if deltas:
            module.register_forward_hook(
                lambda _m, inputs, out, d=deltas: out + sum(f * (inputs[0] @ a.T) @ b.T for f, a, b in d)
            )
    with torch.no_grad():
        return reference(torch.tensor([ids])).logits[0].numpy()


def logits_with_merged_weights(model: Path, layers: list[StackLayer], ids: list[int]) -> np.ndarray:
    """Plain transformers with W + sum_i w_i s_i B_i A_i written into the weights."""
    reference = plain_model(model)
    with torch.no_grad():
        for name, module in reference.named_modules():
            match = _PROJECTION.fullmatch(name)
            if match is None:
                continue
            key = f"layers.{match[1]}.{match[2]}"
            for _, w, c, s in layers:
                if key in c:
                    module.weight += w * s * torch.from_numpy(c[key][1] @ c[key][0])
        return reference(torch.tensor([ids])).logits[0].numpy()


def collect(events) -> tuple[str, Finish]:  # type: ignore[no-untyped-def]
    text = ""
    for event in events:
        if isinstance(event, Finish):
            return text, event
        assert isinstance(event, Token)
        text += event.text
    raise AssertionError("no Finish")


def test_stack_logits_equal_base_plus_each_adapter_applied_separately(
    backend: TorchBackend, tiny_model: Path, prompt: list[int]
) -> None:
    layers = scaled(three_layers(tiny_model), 10.0)
    stack = assemble(layers)
    got = backend.logits(prompt, stack)
    separate = logits_with_separate_adapters(tiny_model, layers, prompt)
    base = backend.logits(prompt, None)
    assert np.abs(separate - base).max() > 0.1  # the adapters do change the output
    np.testing.assert_allclose(got, separate, atol=1e-4, rtol=0)
    np.testing.assert_allclose(got, logits_with_merged_weights(tiny_model, layers, prompt), atol=1e-4, rtol=0)


def test_logits_without_a_stack_are_plain_transformers(backend: TorchBackend, tiny_model: Path, prompt: list[int]) -> None:
    with_stack = backend.logits(prompt, assemble(scaled(three_layers(tiny_model), 10.0)))  # must leave no trace
    with torch.no_grad():
        expected = plain_model(tiny_model)(torch.tensor([prompt])).logits[0].numpy()
    assert np.abs(with_stack - expected).max() > 0.1  # a leftover stack would break the tolerance below
    np.testing.assert_allclose(backend.logits(prompt, None), expected, atol=1e-5, rtol=0)


def test_on_cpu_a_stack_runs_every_linear_layer_on_packed_weights_and_the_base_none(
    backend: TorchBackend, tiny_model: Path, prompt: list[int]
) -> None:
    from torch.profiler import ProfilerActivity, profile

    def packed_matmuls(stack: LoraStack | None) -> int:
        with profile(activities=[ProfilerActivity.CPU]) as run:
            backend.logits(prompt, stack)
        return sum(event.count for event in run.key_averages() if event.key == "mkldnn::_linear_pointwise")

    assert can_pack("cpu", torch.float32)
    # Seven projections per block and the output head; the stack touches only some of them.
    assert packed_matmuls(assemble(three_layers(tiny_model))) == 7 * tiny_spec(tiny_model).num_hidden_layers + 1
    assert packed_matmuls(None) == 0

def test_peft_and_mlx_layouts_of_one_adapter_give_what_peft_computes(
    backend: TorchBackend, tiny_model: Path, prompt: list[int], tmp_path: Path
) -> None:
    from peft import PeftModel

    spec = tiny_spec(tiny_model)
    modules = ("q_proj", "v_proj", "down_proj")
    canonical: Canonical = {k: (a * 20, b * 20) for k, (a, b) in random_canonical(spec, 4, modules, (0, 1), 7).items()}
    peft = peft_files(canonical, rank=4, alpha=8.0, target_modules=modules)
    for name, data in peft.items():
        (tmp_path / name).write_bytes(data)
    with torch.no_grad():
        expected = PeftModel.from_pretrained(plain_model(tiny_model), tmp_path)(torch.tensor([prompt])).logits[0].numpy()
    for files in (peft, mlx_files(canonical, rank=4, scale=2.0, target_modules=modules)):
        info = parse_adapter(files, spec, max_rank=8)
        stack = assemble([("one", 1.0, to_canonical(files, info), info.scale)])
        np.testing.assert_allclose(backend.logits(prompt, stack), expected, atol=1e-4, rtol=0)


def test_greedy_without_a_stack_generates_what_transformers_generate_does(
    backend: TorchBackend, tiny_model: Path, prompt: list[int]
) -> None:
    from transformers import AutoTokenizer

    text, finish = collect(backend.generate(QUESTION, None, Sampling(max_tokens=20)))
    with torch.no_grad():
        out = plain_model(tiny_model).generate(torch.tensor([prompt]), max_new_tokens=20, do_sample=False)
    new = out[0, len(prompt) :].tolist()
    assert finish.completion_tokens == len(new) and finish.prompt_tokens == len(prompt)
    assert text == AutoTokenizer.from_pretrained(tiny_model).decode(new, skip_special_tokens=True)


@pytest.mark.parametrize("temperature", [2.2250738585e-313, 1e-9])
def test_a_temperature_too_small_to_divide_by_runs_greedy_instead_of_failing(backend: TorchBackend, temperature: float) -> None:
    # Found by the contract fuzzer: logits / 2e-313 overflowed to inf and sampling failed on NaN.
    greedy = collect(backend.generate(QUESTION, None, Sampling(max_tokens=8)))
    tiny = collect(backend.generate(QUESTION, None, Sampling(max_tokens=8, temperature=temperature, seed=1)))
    assert tiny[1].reason != "error" and tiny == greedy


def test_100_alternating_requests_load_the_base_once_and_match_fresh_loads(tiny_model: Path) -> None:
    personas = {
        "ada": assemble(scaled(three_layers(tiny_model, seed=10), 10.0)),
        "bob": assemble(scaled(three_layers(tiny_model, seed=20), 10.0)),
    }
    sampling = Sampling(max_tokens=12, temperature=0.8, seed=3)
    expected = {}
    for name, stack in personas.items():
        fresh = TorchBackend(tiny_model, device="cpu")
        expected[name] = collect(fresh.generate(QUESTION, stack, sampling))
    assert expected["ada"][0] != expected["bob"][0]

    shared = TorchBackend(tiny_model, device="cpu")

    async def alternate() -> list[tuple[str, tuple[str, Finish]]]:
        async with Engine(shared) as engine:
            order = ["ada", "bob"] * 50
            return [(name, await engine.complete(QUESTION, personas[name], sampling)) for name in order]

    results = asyncio.run(alternate())
    assert len(results) == 100
    for name, outcome in results:
        assert outcome == expected[name]
    assert shared.loads == 1


def test_a_prompt_that_repeats_the_last_ones_beginning_reuses_its_keys_and_values_exactly(tiny_model: Path) -> None:
    system = ChatMessage("system", "You are a helpful assistant. Answer the question briefly and truthfully.")
    chats = [[system, ChatMessage("user", question)] for question in ("Hello!", "What is the capital of Italy?")]
    stack = assemble(scaled(three_layers(tiny_model, seed=30), 10.0))
    cached = TorchBackend(tiny_model, device="cpu")
    uncached = TorchBackend(tiny_model, device="cpu", prompt_cache_bytes=0)
    sampling = Sampling(max_tokens=10)
    for chat, layers in [(chats[0], stack), (chats[1], stack), (chats[1], None), (chats[0], None), (chats[0], stack)]:
        assert collect(cached.generate(chat, layers, sampling)) == collect(uncached.generate(chat, layers, sampling))
    # The second chat under the stack reuses the shared system turn; the last repeats a whole prompt.
    assert cached.prompt_cache.reused_tokens >= 2 * len(cached.encode_chat([system]))
    assert uncached.prompt_cache.reused_tokens == 0


def test_a_seed_fixes_sampled_tokens_and_another_seed_changes_them(backend: TorchBackend) -> None:
    def sample(seed: int, top_p: float = 1.0) -> str:
        return collect(backend.generate(QUESTION, None, Sampling(temperature=1.0, top_p=top_p, seed=seed, max_tokens=16)))[0]

    assert sample(1) == sample(1) and sample(1) != sample(2)
    assert sample(5, top_p=0.5) == sample(5, top_p=0.5)


def test_stop_strings_end_the_answer_and_are_never_emitted(backend: TorchBackend) -> None:
    full, _ = collect(backend.generate(QUESTION, None, Sampling(max_tokens=30)))
    stop = full[5:8]
    text, finish = collect(backend.generate(QUESTION, None, Sampling(max_tokens=30, stop=(stop,))))
    assert finish.reason == "stop" and text == full[: full.index(stop)] and stop not in text


def test_a_repetition_loop_ends_with_repetition(tiny_model: Path) -> None:
    # The tiny model's greedy answer to "Hello" repeats one token three times in a row.
    looping = TorchBackend(tiny_model, device="cpu", repetition=RepetitionRule(max_period=1, min_repeats=3, min_span=3))
    events = list(looping.generate([ChatMessage("user", "Hello")], None, Sampling(max_tokens=500)))
    finish = events[-1]
    assert isinstance(finish, Finish) and finish.reason == "repetition"
    assert len({t.token_id for t in events[-4:-1]}) == 1


def test_non_finite_logits_end_the_request_with_an_error(backend: TorchBackend, tiny_model: Path) -> None:
    spec = tiny_spec(tiny_model)
    a = np.full((1, spec.hidden_size), 1e30, np.float32)
    b = np.full((spec.hidden_size, 1), 1e30, np.float32)
    overflowing = LoraStack(key="overflow", layers=(("huge", 1.0),), modules={"layers.0.q_proj": (a, b)}, parts=())
    events = list(backend.generate(QUESTION, overflowing, Sampling(max_tokens=5)))
    assert events == [Finish("error", events[0].prompt_tokens, 0, "non-finite logits (NaN or Inf) at generated token 1")]


def test_cancellation_stops_between_tokens(backend: TorchBackend) -> None:
    seen: list[Token] = []
    events = backend.generate(QUESTION, None, Sampling(max_tokens=50), cancelled=lambda: len(seen) >= 3)
    for event in events:
        if isinstance(event, Token):
            seen.append(event)
        else:
            assert event.reason == "cancelled" and event.completion_tokens >= 3
    assert len(seen) == 3


@pytest.mark.parametrize(
    ("module", "a_shape", "b_shape", "message"),
    [
        ("layers.7.q_proj", (2, 64), (64, 2), "stack module 'layers.7.q_proj' is not in .*: the model has 2 blocks"),
        ("layers.0.lm_head", (2, 64), (64, 2), "expected 'layers.<i>.<module>' with a module among q_proj"),
        ("layers.0.q_proj", (2, 576), (64, 2), r"expected \(in, out\) = \(64, 64\) .*got A \(2, 576\) and B \(64, 2\)"),
    ],
)
def test_a_stack_that_does_not_fit_the_model_is_refused_before_any_token(
    backend: TorchBackend, module: str, a_shape: tuple[int, int], b_shape: tuple[int, int], message: str
) -> None:
    stack = LoraStack(
        key=f"bad-{module}-{a_shape}", layers=(("x", 1.0),),
        modules={module: (np.zeros(a_shape, np.float32), np.zeros(b_shape, np.float32))}, parts=(),
    )  # fmt: skip
    with pytest.raises(StackMismatch, match=message):
        backend.generate(QUESTION, stack, Sampling())

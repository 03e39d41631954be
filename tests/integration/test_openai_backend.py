"""The openai backend against a real mlx_lm.server on loopback, serving the tiny random Llama."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

import numpy as np
import pytest

from fixtures.make_adapter import random_canonical
from fixtures.make_model import tiny_spec
from inference.backends.base import ChatMessage, Finish, Sampling, Token
from inference.lora.adapter import CONFIG_FILE, parse_adapter, to_canonical
from inference.lora.stack import LoraStack, assemble

pytest.importorskip("mlx_lm")

from inference.backends.mlx import MlxBackend  # noqa: E402
from inference.backends.openai import (  # noqa: E402
    OpenAIBackend,
    ServerRefused,
    ServerUnavailable,
    adapter_files,
)

QUESTION = [ChatMessage("user", "What is the capital of France?")]
STARTUP_SECONDS = 60.0
POLL_SECONDS = 0.1


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_until_healthy(server: subprocess.Popen[bytes], url: str, log: IO[bytes]) -> None:
    """Poll /health; waiting on the process between tries also notices a server that died."""
    for _ in range(int(STARTUP_SECONDS / POLL_SECONDS)):
        try:
            with urllib.request.urlopen(url, timeout=POLL_SECONDS) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        try:
            code = server.wait(timeout=POLL_SECONDS)
        except subprocess.TimeoutExpired:
            continue
        raise RuntimeError(f"mlx_lm.server exited with {code} before it was healthy:\n{_tail(log)}")
    raise RuntimeError(f"mlx_lm.server not healthy at {url} after {STARTUP_SECONDS} s")


@contextmanager
def serving(model: Path) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """A real mlx_lm.server for `model` on a free loopback port: (process, base url)."""
    port = free_port()
    command = [sys.executable, "-m", "mlx_lm", "server", "--model", str(model), "--port", str(port)]
    environment = {**os.environ, "HF_HUB_OFFLINE": "1"}
    # Its log goes to a file, never a pipe nobody reads: a server that logs every request
    # would block once the pipe is full.
    with tempfile.TemporaryFile() as log:
        server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=environment)
        try:
            wait_until_healthy(server, f"http://127.0.0.1:{port}/health", log)
            yield server, f"http://127.0.0.1:{port}/v1"
        finally:
            server.kill()
            server.wait(timeout=30)


def _tail(log: IO[bytes]) -> str:
    log.seek(0)
    return log.read().decode(errors="replace")[-3000:]


@pytest.fixture(scope="module")
def server_url(tiny_model: Path) -> Iterator[str]:
    with serving(tiny_model) as (_, url):
        yield url


@pytest.fixture(scope="module")
def local(tiny_model: Path) -> MlxBackend:
    return MlxBackend(tiny_model)


def remote(url: str, model: Path, adapters_dir: Path, *, stream: bool = True) -> OpenAIBackend:
    # mlx_lm.server applies per-request adapters only to a model named by its path.
    return OpenAIBackend(
        url, "", str(model), adapters="mlx-lm", adapters_dir=adapters_dir, stream=stream, max_retries=0
    )


def text_and_finish(events: Iterator[Token | Finish]) -> tuple[str, Finish]:
    items = list(events)
    assert all(isinstance(item, Token) for item in items[:-1]) and isinstance(items[-1], Finish)
    return "".join(item.text for item in items[:-1]), items[-1]  # type: ignore[union-attr]


def same_answer(server_text: str, local_text: str) -> bool:
    # mlx_lm.server drops the answer's leading space and sends a trailing incomplete
    # character as U+FFFD; the guard holds that back. The tokens in between are the same.
    return server_text.rstrip("\ufffd") == local_text.lstrip(" ")


def a_stack(model: Path) -> LoraStack:
    spec = tiny_spec(model)
    # x10: random LoRA at std 0.02 barely moves this model's greedy answer.
    first = {k: (a * 10, b * 10) for k, (a, b) in random_canonical(spec, 4, ("q_proj", "down_proj"), (0, 1), 1).items()}
    second = {k: (a * 10, b * 10) for k, (a, b) in random_canonical(spec, 8, ("q_proj",), (1,), 2).items()}
    return assemble([("served-a", 0.7, first, 2.0), ("served-b", -0.5, second, 1.0)])


def test_streamed_and_whole_answers_match_the_local_mlx_backend(
    server_url: str, tiny_model: Path, local: MlxBackend, tmp_path: Path
) -> None:
    sampling = Sampling(max_tokens=12)
    streamed, finish = text_and_finish(remote(server_url, tiny_model, tmp_path).generate(QUESTION, None, sampling))
    whole, whole_finish = text_and_finish(
        remote(server_url, tiny_model, tmp_path, stream=False).generate(QUESTION, None, sampling)
    )
    expected, local_finish = text_and_finish(local.generate(QUESTION, None, sampling))
    assert streamed == whole and same_answer(streamed, expected)
    assert finish == whole_finish == Finish("length", local_finish.prompt_tokens, 12)


def test_a_stack_is_served_as_an_adapter_and_answers_like_the_local_stack(
    server_url: str, tiny_model: Path, local: MlxBackend, tmp_path: Path
) -> None:
    stack = a_stack(tiny_model)
    sampling = Sampling(max_tokens=12)
    served, finish = text_and_finish(remote(server_url, tiny_model, tmp_path).generate(QUESTION, stack, sampling))
    expected, _ = text_and_finish(local.generate(QUESTION, stack, sampling))
    plain, _ = text_and_finish(local.generate(QUESTION, None, sampling))
    assert same_answer(served, expected) and not same_answer(served, plain)
    assert finish.reason == "length"
    assert sorted(p.name for p in (tmp_path / "mlx-lm").iterdir()) == [stack.key]


def test_the_configured_backend_asks_for_the_servers_own_model_name(
    server_url: str, tiny_model: Path, local: MlxBackend, tmp_path: Path
) -> None:
    from genome_service.services.backend import open_configured_backend
    from genome_service.settings import Settings
    from inference.models import ModelCatalog

    def configured(**model: str):  # type: ignore[no-untyped-def]
        settings = Settings(
            data_dir=tmp_path, inference_backend="openai", openai_base_url=server_url,
            openai_adapter_protocol="mlx-lm", **model,
        )  # fmt: skip
        return open_configured_backend(settings, ModelCatalog(settings.resolved_models_dir))[0]

    # The catalog's name (GENOME_INFERENCE_MODEL) is not one mlx_lm.server knows.
    with pytest.raises(ServerRefused, match="HTTP 404"):
        configured().generate(QUESTION, None, Sampling(max_tokens=4))
    stack, sampling = a_stack(tiny_model), Sampling(max_tokens=12)
    served, _ = text_and_finish(configured(openai_model=str(tiny_model)).generate(QUESTION, stack, sampling))
    expected, _ = text_and_finish(local.generate(QUESTION, stack, sampling))
    assert same_answer(served, expected)

def test_stop_strings_end_the_answer_and_are_never_emitted(server_url: str, tiny_model: Path, tmp_path: Path) -> None:
    backend = remote(server_url, tiny_model, tmp_path)
    full, _ = text_and_finish(backend.generate(QUESTION, None, Sampling(max_tokens=20)))
    stop = full[4:8]
    for stream in (True, False):
        backend = remote(server_url, tiny_model, tmp_path, stream=stream)
        text, finish = text_and_finish(backend.generate(QUESTION, None, Sampling(max_tokens=20, stop=(stop,))))
        assert (text, finish.reason) == (full[: full.index(stop)], "stop")


def test_cancelling_closes_the_stream_between_tokens(server_url: str, tiny_model: Path, tmp_path: Path) -> None:
    calls = iter(range(100))
    backend = remote(server_url, tiny_model, tmp_path)
    events = list(backend.generate(QUESTION, None, Sampling(max_tokens=50), cancelled=lambda: next(calls) >= 3))
    assert isinstance(events[-1], Finish) and events[-1].reason == "cancelled"
    assert len(events) == 4


def test_seeded_sampling_is_repeatable_on_the_server(server_url: str, tiny_model: Path, tmp_path: Path) -> None:
    backend = remote(server_url, tiny_model, tmp_path)

    def sample(seed: int) -> str:
        return text_and_finish(backend.generate(QUESTION, None, Sampling(temperature=1.0, seed=seed, max_tokens=16)))[0]

    assert sample(3) == sample(3) != sample(4)


def test_a_server_that_dies_mid_answer_ends_it_with_an_error_finish(tiny_model: Path, tmp_path: Path) -> None:
    with serving(tiny_model) as (server, url):
        events = remote(url, tiny_model, tmp_path).generate(QUESTION, None, Sampling(max_tokens=2000))
        first = next(events)
        server.kill()
        rest = list(events)
    assert isinstance(first, Token)
    finish = rest[-1]
    assert isinstance(finish, Finish) and finish.reason == "error" and finish.error
    assert url in finish.error and finish.completion_tokens < 2000


def test_an_unknown_model_is_refused_before_any_token(server_url: str, tmp_path: Path) -> None:
    backend = OpenAIBackend(server_url, "unused", "no-such-model", adapters="mlx-lm", adapters_dir=tmp_path)
    with pytest.raises(ServerRefused, match=r"model 'no-such-model': HTTP 404") as caught:
        backend.generate(QUESTION, None, Sampling(max_tokens=4))
    assert caught.value.status == 404


def test_no_server_is_unavailable_before_any_token(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}/v1"
    backend = OpenAIBackend(url, "unused", "m", adapters="mlx-lm", adapters_dir=tmp_path, max_retries=0)
    with pytest.raises(ServerUnavailable, match="no answer"):
        backend.generate(QUESTION, None, Sampling(max_tokens=4))


@pytest.mark.parametrize("protocol", ["vllm", "mlx-lm"])
def test_adapter_files_hold_the_stack_exactly_at_scale_one(tiny_model: Path, protocol: str) -> None:
    stack = a_stack(tiny_model)
    files = adapter_files(protocol, stack)  # type: ignore[arg-type]
    info = parse_adapter(files, tiny_spec(tiny_model), max_rank=64)
    assert info.format == ("peft" if protocol == "vllm" else "mlx")
    assert (info.rank, info.scale) == (12, 1.0)  # q_proj of block 1 carries 4 + 8
    assert json.loads(files[CONFIG_FILE])  # a config the server can read
    for key, (a, b) in to_canonical(files, info).items():
        # Modules of rank 4 are zero-padded to 12: the stored factors are the stack's, then
        # zeros, so the product B A is unchanged. The factors are exact; the products are
        # computed (BLAS may sum in another order), so they are compared within a tolerance
        # that a wrong scale would still break.
        stack_a, stack_b = stack.modules[key]
        rank = stack_a.shape[0]
        np.testing.assert_array_equal(a[:rank], stack_a)
        np.testing.assert_array_equal(b[:, :rank], stack_b)
        assert not a[rank:].any() and not b[:, rank:].any()
        np.testing.assert_allclose(b @ a, stack_b @ stack_a, rtol=1e-5, atol=1e-7)

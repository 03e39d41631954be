"""OpenAI-compatible HTTP backend: the scale-out path (vLLM, mlx_lm.server).

A LoRA stack reaches the server as one adapter folder, written once per `stack.key` under
`adapters_dir` (which the server must be able to read at the same path). The stack's
factors are already exact (B_cat holds w_i * s_i), so the folder says rank R and scale 1:
y = W x + 1 * B_cat (A_cat x). Modules with a smaller R are zero-padded to the largest R,
which adds exactly nothing, because both servers want one rank per adapter.

- vLLM: `POST /v1/load_lora_adapter` (server started with VLLM_ALLOW_RUNTIME_LORA_UPDATING=1)
  registers a PEFT folder under a name; requests then name that adapter as the model.
- mlx_lm.server: requests name the base model by the path the server was started with
  (`--model`; its alias "default_model" ignores per-request adapters) and pass the mlx-lm
  folder as `adapters`.

HTTP failures before the first token raise `ServerUnavailable` (no answer, 5xx) or
`ServerRefused` (4xx); a failure mid-stream ends the answer with Finish(reason="error").
The server samples and knows the token ids (Tokens carry token_id -1). Stop strings are
also cut here: mlx_lm.server matches them as token sequences, so a stop word tokenised
differently in context is deleted from the text but does not end the answer.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import httpx
import numpy as np
import openai

from inference.backends.base import ChatMessage, Finish, FinishReason, Sampling, Token, never_cancelled
from inference.guards import StopMatcher
from inference.lora.adapter import Canonical, mlx_files, peft_files
from inference.lora.stack import LoraStack

AdapterProtocol = Literal["vllm", "mlx-lm"]
UNKNOWN_TOKEN_ID = -1  # the OpenAI API sends text, not token ids
_FINISH_REASONS: Mapping[str, FinishReason] = {"stop": "stop", "length": "length"}


class ServerError(RuntimeError):
    """The inference server did not serve the request."""


class ServerUnavailable(ServerError):
    """No answer, a timeout or a 5xx: worth retrying later."""


class ServerRefused(ServerError):
    """A 4xx: the request (model, adapter, key, parameters) is wrong for this server."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class OpenAIBackend:
    """A `Backend` that streams chat completions from an OpenAI-compatible server."""

    name = "openai"

    def __init__(
        self,
        base_url: str,
        api_key: str,
        model: str,
        *,
        adapters: AdapterProtocol = "vllm",
        adapters_dir: Path | None = None,
        stream: bool = True,
        timeout: float = 120.0,
        max_retries: int = 2,
    ) -> None:
        if adapters not in ("vllm", "mlx-lm"):
            raise ValueError(f"adapters: expected 'vllm' or 'mlx-lm', got {adapters!r}")
        if not model:
            raise ValueError("model: expected the server's base model name, got an empty string")
        # The client refuses an empty key; servers run without auth (vLLM with no --api-key,
        # mlx_lm.server) ignore the header, and vLLM's docs use "EMPTY" for exactly this.
        self._client = openai.OpenAI(
            base_url=base_url, api_key=api_key or "EMPTY", timeout=timeout, max_retries=max_retries
        )
        self._base_url = base_url
        self._model = model
        self._protocol: AdapterProtocol = adapters
        self._adapters_dir = None if adapters_dir is None else Path(adapters_dir)
        self._stream = stream
        self._registered: set[str] = set()  # vLLM adapter names this backend has loaded

    @property
    def loads(self) -> int:
        # The server holds the base model; this process never loads it.
        return 0

    def generate(
        self,
        messages: Sequence[ChatMessage],
        stack: LoraStack | None,
        sampling: Sampling,
        cancelled: Callable[[], bool] = never_cancelled,
    ) -> Iterator[Token | Finish]:
        """Send the request now (HTTP errors raise here); yield Tokens, then one Finish."""
        if not messages:
            raise ValueError("messages: expected at least one message, got none")
        response = self._send(messages, stack, sampling)
        if self._stream:
            return self._chunks(response, StopMatcher(sampling.stop), cancelled)
        return self._whole(response, StopMatcher(sampling.stop))

    # --- requests ----------------------------------------------------------------------

    def _request(self, messages: Sequence[ChatMessage], stack: LoraStack | None, sampling: Sampling) -> dict[str, Any]:
        request: dict[str, Any] = {
            "model": self._model,
            "messages": [{"role": m.role, "content": m.content} for m in messages],
            "temperature": sampling.temperature,
            "top_p": sampling.top_p,
            "max_tokens": sampling.max_tokens,
            "stream": self._stream,
        }
        if sampling.stop and self._protocol == "vllm":
            request["stop"] = list(sampling.stop)
        if sampling.seed is not None:
            request["seed"] = sampling.seed
        if self._stream:
            request["stream_options"] = {"include_usage": True}
        # A stack whose every weight is 0 has no modules: it is the base model, exactly.
        if stack is not None and stack.modules:
            folder = self._adapter_folder(stack)
            if self._protocol == "vllm":
                request["model"] = self._register(stack, folder)
            else:
                request["extra_body"] = {"adapters": str(folder)}
        return request

    def _send(self, messages: Sequence[ChatMessage], stack: LoraStack | None, sampling: Sampling) -> Any:
        try:
            return self._call(self._request(messages, stack, sampling))
        except ServerRefused as exc:
            # A restarted vLLM forgets runtime adapters: register again, once.
            if exc.status != 404 or stack is None or self._protocol != "vllm":
                raise
            self._registered.discard(_adapter_name(stack))
            return self._call(self._request(messages, stack, sampling))

    def _call(self, request: dict[str, Any]) -> Any:
        try:
            return self._client.chat.completions.create(**request)
        except openai.APIStatusError as exc:
            raise _refused_or_unavailable(self._base_url, exc, request["model"]) from exc
        except openai.APIConnectionError as exc:
            raise ServerUnavailable(f"{self._base_url}: no answer ({exc})") from exc

    def _whole(self, completion: Any, stops: StopMatcher) -> Iterator[Token | Finish]:
        choice = completion.choices[0]
        usage = completion.usage
        prompt_tokens, completion_tokens = (usage.prompt_tokens, usage.completion_tokens) if usage else (0, 0)
        text, stopped = stops.feed(choice.message.content or "")
        if stopped:
            finish = Finish("stop", prompt_tokens, completion_tokens)
        else:
            text += stops.flush()
            finish = self._finish(choice.finish_reason, prompt_tokens, completion_tokens)
        return iter([Token(text, UNKNOWN_TOKEN_ID), finish] if text else [finish])

    def _chunks(self, chunks: Any, stops: StopMatcher, cancelled: Callable[[], bool]) -> Iterator[Token | Finish]:
        reason: str | None = None
        pieces = 0
        prompt_tokens = completion_tokens = None
        try:
            for chunk in chunks:
                if cancelled():
                    yield Finish("cancelled", prompt_tokens or 0, pieces)
                    return
                if chunk.usage is not None:
                    prompt_tokens, completion_tokens = chunk.usage.prompt_tokens, chunk.usage.completion_tokens
                for choice in chunk.choices:
                    if choice.delta.content:
                        pieces += 1
                        text, stopped = stops.feed(choice.delta.content)
                        if text:
                            yield Token(text, UNKNOWN_TOKEN_ID)
                        if stopped:
                            yield Finish("stop", prompt_tokens or 0, pieces)
                            return
                    reason = choice.finish_reason or reason
        except (openai.APIError, httpx.HTTPError) as exc:
            # httpx errors (a dropped connection, a read timeout) reach the stream unwrapped.
            yield Finish("error", prompt_tokens or 0, pieces, f"{self._base_url}: {exc}")
            return
        finally:
            # Closing the response tells the server the client is gone (stop, cancel, error, done).
            chunks.close()
        tail = stops.flush()
        if tail:
            yield Token(tail, UNKNOWN_TOKEN_ID)
        yield self._finish(reason, prompt_tokens or 0, completion_tokens if completion_tokens is not None else pieces)

    def _finish(self, reason: str | None, prompt_tokens: int, completion_tokens: int) -> Finish:
        if reason in _FINISH_REASONS:
            return Finish(_FINISH_REASONS[reason], prompt_tokens, completion_tokens)
        if reason is None:
            # A server that closes the connection (crash, restart) can end the body cleanly.
            error = f"{self._base_url}: the answer ended without a finish_reason (connection closed mid-answer)"
        else:
            error = f"{self._base_url}: the answer ended with finish_reason {reason!r}, expected 'stop' or 'length'"
        return Finish("error", prompt_tokens, completion_tokens, error)

    # --- adapters ----------------------------------------------------------------------

    def _adapter_folder(self, stack: LoraStack) -> Path:
        """The stack as an adapter folder in this server's layout, written once."""
        if self._adapters_dir is None:
            raise ValueError("the openai backend needs adapters_dir (GENOME_OPENAI_ADAPTERS_DIR) to serve a LoRA stack")
        folder = self._adapters_dir / self._protocol / stack.key
        if folder.is_dir():
            return folder
        files = adapter_files(self._protocol, stack)
        folder.parent.mkdir(parents=True, exist_ok=True)
        # Written aside and renamed: a server (or another worker) never sees half a folder.
        staging = Path(tempfile.mkdtemp(prefix=f".{stack.key[:12]}.", dir=folder.parent))
        for name, data in files.items():
            (staging / name).write_bytes(data)
        try:
            os.rename(staging, folder)
        except OSError:
            shutil.rmtree(staging)  # another writer got there first with the same bytes
            if not folder.is_dir():
                raise
        return folder

    def _register(self, stack: LoraStack, folder: Path) -> str:
        name = _adapter_name(stack)
        if name in self._registered:
            return name
        try:
            self._client.post(
                "/load_lora_adapter", body={"lora_name": name, "lora_path": str(folder)}, cast_to=str
            )
        except openai.APIStatusError as exc:
            # vLLM answers 400 for a name it already has (another worker registered it).
            if not (exc.status_code == 400 and "already been loaded" in str(exc)):
                raise _refused_or_unavailable(self._base_url, exc, name) from exc
        except openai.APIConnectionError as exc:
            raise ServerUnavailable(f"{self._base_url}: no answer ({exc})") from exc
        self._registered.add(name)
        return name


def _adapter_name(stack: LoraStack) -> str:
    return f"stack-{stack.key}"


def adapter_files(protocol: AdapterProtocol, stack: LoraStack) -> dict[str, bytes]:
    """The stack as one adapter (PEFT for vLLM, mlx-lm otherwise) with rank R and scale 1."""
    rank = max(a.shape[0] for a, _ in stack.modules.values())
    canonical: Canonical = {key: _padded(a, b, rank) for key, (a, b) in stack.modules.items()}
    modules = sorted({key.rsplit(".", 1)[1] for key in canonical})
    if protocol == "vllm":
        return peft_files(canonical, rank, alpha=float(rank), target_modules=modules)  # alpha / r = 1
    return mlx_files(canonical, rank, scale=1.0, target_modules=modules)


def _padded(a: np.ndarray, b: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
    # Zero rows of A and zero columns of B: B_pad (A_pad x) = B (A x) exactly.
    extra = rank - a.shape[0]
    return np.pad(a, ((0, extra), (0, 0))), np.pad(b, ((0, 0), (0, extra)))


def _refused_or_unavailable(base_url: str, exc: openai.APIStatusError, model: str) -> ServerError:
    message = f"{base_url}: model {model!r}: HTTP {exc.status_code}: {exc.message}"
    if exc.status_code >= 500:
        return ServerUnavailable(message)
    return ServerRefused(exc.status_code, message)

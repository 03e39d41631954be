"""An API process's view of the inference daemon: one base model's engine, over HTTP.

`DaemonEngine` has the in-process `Engine`'s calling shape (`stream`, `complete`, `timeout`)
but takes the stack as adapter references (`StackEntry`: content hash and weight), which the
daemon resolves and caches itself. A refusal before the first token raises `DaemonRefused`
with the daemon's status and rule; a failure after it ends the stream with a Finish whose
`rule` says why (`model_crashed`, `generation_timed_out`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

import httpx
import msgspec

from inference.backends.base import ChatMessage, Finish, Sampling, Token
from inference.daemon.protocol import StackEntry

UNKNOWN_TOKEN_ID = -1
# Time to connect and to hear response headers; the stream itself may take the request's timeout.
CONNECT_TIMEOUT_S = 10.0
RECONNECT_S = 0.1


class DaemonRefused(RuntimeError):
    def __init__(self, status: int, rule: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.rule = rule


class _Chunk(msgspec.Struct):
    choices: list[dict[str, Any]] = []
    usage: dict[str, int] | None = None
    genome_finish_reason: str | None = None
    genome_worker_pid: int | None = None


class _Problem(msgspec.Struct):
    rule: str = "inference_unavailable"
    detail: str = ""
    status: int = 503
    genome_worker_pid: int | None = None


class DaemonBackendInfo(msgspec.Struct, frozen=True):
    """What academy code asks of an engine's backend: its name, and that this process loads no model."""

    name: str = "daemon"
    loads: int = 0


class DaemonClient:
    """One HTTP connection pool to the daemon at `base_url`, shared by every model's engine."""

    def __init__(self, base_url: str, token: str) -> None:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.base_url = base_url.rstrip("/")
        self.http = httpx.AsyncClient(base_url=self.base_url, headers=headers,
                                      timeout=httpx.Timeout(CONNECT_TIMEOUT_S, read=None))

    def engine(self, model: str, *, timeout: float) -> DaemonEngine:
        return DaemonEngine(self, model, timeout=timeout)

    async def get(self, path: str) -> Any:
        """A JSON resource of the daemon's; `DaemonRefused` when it does not answer or refuses."""
        return msgspec.json.decode(await self.text(path))

    async def text(self, path: str) -> bytes:
        try:
            response = await self.send(self.http.build_request("GET", path, timeout=CONNECT_TIMEOUT_S))
        except httpx.HTTPError as exc:
            raise DaemonRefused(503, "inference_unavailable", f"the inference daemon at {self.base_url} did not answer: {exc}") from None
        if response.status_code != 200:
            raise _refusal(response.status_code, response.content, self.base_url)
        return response.content

    async def send(self, request: httpx.Request, *, stream: bool = False) -> httpx.Response:
        """Send `request`, trying again for up to CONNECT_TIMEOUT_S while nothing listens yet (a daemon starting)."""
        deadline = time.monotonic() + CONNECT_TIMEOUT_S
        while True:
            try:
                return await self.http.send(request, stream=stream)
            except httpx.ConnectError:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(RECONNECT_S)

    async def close(self) -> None:
        await self.http.aclose()


class DaemonEngine:
    def __init__(self, client: DaemonClient, model: str, *, timeout: float) -> None:
        self.client = client
        self.model = model
        self.timeout = timeout
        self.backend = DaemonBackendInfo()

    def stream(
        self,
        messages: Sequence[ChatMessage],
        stack: Sequence[StackEntry] | None,
        sampling: Sampling,
        *,
        priority: int = 0,
        timeout: float | None = None,
        label: str | None = None,
    ) -> AsyncIterator[Token | Finish]:
        limit = self.timeout if timeout is None else timeout
        body = {
            "model": self.model, "messages": [{"role": m.role, "content": m.content} for m in messages],
            "stream": True, "stream_options": {"include_usage": True},
            "temperature": sampling.temperature, "top_p": sampling.top_p, "max_tokens": sampling.max_tokens,
            "stop": list(sampling.stop), "seed": sampling.seed, "genome_ignore_eos": sampling.ignore_eos,
            "genome_stack": list(stack or ()), "genome_priority": priority, "genome_timeout": limit, "genome_label": label,
        }  # fmt: skip
        return self._events(body)

    async def _events(self, body: dict[str, Any]) -> AsyncIterator[Token | Finish]:
        request = self.client.http.build_request("POST", "/v1/chat/completions", content=msgspec.json.encode(body),
                                                 headers={"Content-Type": "application/json"})
        try:
            response = await self.client.send(request, stream=True)
        except httpx.HTTPError as exc:
            raise DaemonRefused(503, "inference_unavailable",
                                f"the inference daemon at {self.client.base_url} did not answer: {exc}") from None
        try:
            if response.status_code != 200:
                raise _refusal(response.status_code, await response.aread(), self.client.base_url)
            pid = int(response.headers.get("x-genome-worker-pid", "0")) or None
            async for event in _parse(response, pid):
                yield event
                if isinstance(event, Finish):
                    return
            yield Finish("error", 0, 0, "the inference daemon closed the stream without finishing it",
                         rule="model_crashed", worker_pid=pid)
        finally:
            # Closing the response tells the daemon the caller went away: it cancels the generation.
            await response.aclose()

    async def complete(self, messages: Sequence[ChatMessage], stack: Sequence[StackEntry] | None, sampling: Sampling,
                       *, priority: int = 0, timeout: float | None = None, label: str | None = None) -> tuple[str, Finish]:
        parts: list[str] = []
        async for event in self.stream(messages, stack, sampling, priority=priority, timeout=timeout, label=label):
            if isinstance(event, Finish):
                return "".join(parts), event
            parts.append(event.text)
        raise AssertionError("unreachable: a stream always ends with a Finish")


async def _parse(response: httpx.Response, pid: int | None) -> AsyncIterator[Token | Finish]:
    """OpenAI chunks as Tokens, then a Finish from the finish chunk and the usage chunk after it."""
    kind, reason, completion = "message", None, 0
    try:
        async for line in response.aiter_lines():
            if line.startswith("event:"):
                kind = line[6:].strip()
                continue
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if kind == "error":
                problem = msgspec.json.decode(data, type=_Problem)
                yield Finish("error", 0, completion, problem.detail, rule=problem.rule, worker_pid=pid)
                return
            if data == "[DONE]":
                yield Finish(reason or "stop", 0, completion, worker_pid=pid)  # type: ignore[arg-type]
                return
            chunk = msgspec.json.decode(data, type=_Chunk)
            if chunk.genome_finish_reason is not None:
                reason = chunk.genome_finish_reason
            if chunk.usage is not None:
                yield Finish(reason or "stop", chunk.usage["prompt_tokens"], chunk.usage["completion_tokens"],  # type: ignore[arg-type]
                             worker_pid=pid)
                return
            for choice in chunk.choices:
                text = (choice.get("delta") or {}).get("content")
                if text:
                    completion += 1
                    yield Token(text, UNKNOWN_TOKEN_ID)
    except httpx.HTTPError as exc:
        yield Finish("error", 0, completion, f"the connection to the inference daemon broke: {exc}",
                     rule="inference_unavailable", worker_pid=pid)


def _refusal(status: int, content: bytes, base_url: str) -> DaemonRefused:
    try:
        problem = msgspec.json.decode(content, type=_Problem)
    except msgspec.DecodeError:
        problem = _Problem(detail=content[:200].decode(errors="replace"))
    if status == 401:
        return DaemonRefused(503, "inference_unavailable", f"the inference daemon at {base_url} refused our token "
                                                           "(GENOME_INFERENCE_TOKEN): " + problem.detail)
    return DaemonRefused(status, problem.rule, problem.detail)

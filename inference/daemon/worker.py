"""A model worker: one base model, one batching engine, in a process of its own.

The daemon starts it (forked from a forkserver that holds only imported modules, or spawned:
either way it shares no state with the daemon), sends requests over a pipe and reads Tokens
back. Everything that can crash, hang or take gigabytes (libtorch, mlx, the weights, the KV
cache) lives here, so a crash takes this process only: the daemon notices the pipe closing and
fails what was in flight.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import threading
from multiprocessing.connection import Connection
from pathlib import Path

import httpx
import msgspec

from inference.backends.base import Finish, Sampling, Token
from inference.daemon.adapters import AdapterMissing, AdapterStacks, FolderBlobs, HttpBlobs
from inference.daemon.protocol import (
    Cancel,
    Ended,
    Failed,
    Figures,
    FiguresReply,
    Generate,
    Ready,
    Refused,
    TokenOut,
    Tokens,
    decode_to_worker,
    encode,
)
from inference.lora.adapter import AdapterRejected
from inference.models import ModelSpec


class WorkerConfig(msgspec.Struct, frozen=True, kw_only=True):
    model: str
    folder: str
    backend: str  # torch or mlx
    device: str
    blobs_dir: str | None  # the API's blob folder, or None to fetch from blobs_url
    blobs_url: str | None
    token: str
    max_lora_rank: int
    adapter_cache_bytes: int
    stack_cache_size: int
    max_queue: int
    timeout: float
    max_batch: int
    max_batch_tokens: int
    prefill_chunk: int


def main(connection: Connection, config: WorkerConfig) -> None:
    """The worker process's entry point: load the model, then serve the pipe until it closes."""
    # Ctrl-C in a terminal reaches the whole process group; the daemon decides when we stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        engine, stacks = _load(config)
    except Exception as exc:  # noqa: BLE001 - whatever stops the model loading is the daemon's error to report
        connection.send_bytes(encode(Failed(f"{config.model}: {type(exc).__name__}: {exc}")))
        return
    connection.send_bytes(encode(Ready(os.getpid(), engine.backend.name)))
    asyncio.run(_Worker(connection, engine, stacks).serve())


def _load(config: WorkerConfig):  # noqa: ANN202 - (Engine, AdapterStacks), both imported lazily
    from inference.backends import open_backend
    from inference.engine import Engine

    folder = Path(config.folder)
    spec = ModelSpec.from_hf_config(config.model, json.loads((folder / "config.json").read_text(encoding="utf-8")))
    backend = open_backend(config.backend, folder=folder, device=config.device,  # type: ignore[arg-type]
                           stack_cache_size=config.stack_cache_size)
    source = FolderBlobs(Path(config.blobs_dir)) if config.blobs_dir else HttpBlobs(config.blobs_url or "", config.token)
    stacks = AdapterStacks(source, spec, max_rank=config.max_lora_rank, adapter_cache_bytes=config.adapter_cache_bytes,
                           stack_cache_size=config.stack_cache_size)
    engine = Engine(backend, max_queue=config.max_queue, timeout=config.timeout, max_batch=config.max_batch,
                    max_batch_tokens=config.max_batch_tokens, prefill_chunk=config.prefill_chunk,
                    stack_hit_rate=lambda: stacks.cache.hit_rate)
    return engine, stacks


class _Worker:
    def __init__(self, connection: Connection, engine, stacks: AdapterStacks) -> None:  # noqa: ANN001 - Engine
        self.connection = connection
        self.engine = engine
        self.stacks = stacks
        self.tasks: dict[int, asyncio.Task[None]] = {}
        self.closed = asyncio.Event()
        # Tokens wait for the end of the loop's turn and go as one message: with a batch of
        # rows each step makes one token per row, and a pipe write per token costs the daemon
        # a wake-up per token.
        self.tokens: list[TokenOut] = []

    async def serve(self) -> None:
        loop = asyncio.get_running_loop()
        self.engine.start()
        threading.Thread(target=self._read, args=(loop,), name="worker-pipe", daemon=True).start()
        await self.closed.wait()
        for task in list(self.tasks.values()):
            task.cancel()
        await self.engine.close()

    def _read(self, loop: asyncio.AbstractEventLoop) -> None:
        # The pipe's other end closing means the daemon is gone: nobody will read an answer.
        while True:
            try:
                message = decode_to_worker(self.connection.recv_bytes())
            except (EOFError, OSError):
                loop.call_soon_threadsafe(self.closed.set)
                return
            loop.call_soon_threadsafe(self._dispatch, message)

    def _token(self, token: TokenOut) -> None:
        if not self.tokens:
            asyncio.get_running_loop().call_soon(self._flush)
        self.tokens.append(token)

    def _flush(self) -> None:
        tokens, self.tokens = self.tokens, []
        if tokens:
            self._send(tokens[0] if len(tokens) == 1 else Tokens(tokens))

    def _send(self, message: msgspec.Struct) -> None:
        try:
            self.connection.send_bytes(encode(message))
        except (BrokenPipeError, OSError):
            self.closed.set()

    def _dispatch(self, message: Generate | Cancel | Figures) -> None:
        if isinstance(message, Generate):
            task = asyncio.create_task(self._generate(message))
            self.tasks[message.id] = task
            task.add_done_callback(lambda _: self.tasks.pop(message.id, None))
        elif isinstance(message, Cancel):
            task = self.tasks.get(message.id)
            if task is not None:
                task.cancel()
        else:
            self._send(FiguresReply(
                message.id, msgspec.json.encode(self.engine.stats()), msgspec.json.encode(self.engine.label_stats()),
                _exposition(self.engine.metrics.registry),
            ))  # fmt: skip

    async def _generate(self, request: Generate) -> None:
        from inference.engine import QueueFull

        try:
            sampling = Sampling(temperature=request.temperature, top_p=request.top_p, max_tokens=request.max_tokens,
                                stop=tuple(request.stop), seed=request.seed, ignore_eos=request.ignore_eos)
        except ValueError as exc:
            self._send(Refused(request.id, 422, "sampling_out_of_range", str(exc)))
            return
        entries = [(entry.adapter_sha256, entry.weight, entry.scale) for entry in request.stack]
        try:
            stack = await asyncio.to_thread(self.stacks.stack, entries)
            events = self.engine.stream(request.messages, stack, sampling, priority=request.priority,
                                        timeout=request.timeout, label=request.label)
        except AdapterMissing as exc:
            self._send(Refused(request.id, 404, "adapter_not_found", str(exc)))
            return
        except AdapterRejected as exc:
            self._send(Refused(request.id, 422, exc.reason, str(exc)))
            return
        except ValueError as exc:  # the stack's own rules (each adapter once, finite gains)
            self._send(Refused(request.id, 422, "invalid_stack", str(exc)))
            return
        except (httpx.HTTPError, OSError) as exc:
            self._send(Refused(request.id, 503, "adapter_unavailable", f"the adapter blobs could not be read: {exc}"))
            return
        except QueueFull as exc:
            self._send(Refused(request.id, 429, "inference_busy", str(exc)))
            return
        except Exception as exc:  # noqa: BLE001 - unforeseen: the caller still hears why, and nothing waits on it
            self._send(Refused(request.id, 500, "generation_failed", f"{type(exc).__name__}: {exc}"))
            return
        try:
            async for event in events:
                if isinstance(event, Token):
                    self._token(TokenOut(request.id, event.text, event.token_id))
                else:
                    self._flush()  # its tokens before its end
                    self._send(_ended(request.id, event))
        except Exception as exc:  # noqa: BLE001 - as above: an end, never a silent stop
            self._flush()
            self._send(Ended(request.id, "error", 0, 0, f"{type(exc).__name__}: {exc}", "generation_failed"))
        finally:
            await events.aclose()  # type: ignore[attr-defined]


def _ended(request_id: int, finish: Finish) -> Ended:
    rule = finish.rule or ("generation_failed" if finish.reason == "error" else None)
    return Ended(request_id, finish.reason, finish.prompt_tokens, finish.completion_tokens, finish.error, rule)


def _exposition(registry: object) -> str:
    from prometheus_client import generate_latest

    return generate_latest(registry).decode()  # type: ignore[arg-type]

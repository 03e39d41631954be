"""mlx-lm backend: one base model in memory, LoRA stacks swapped in per request.

Each targeted projection is wrapped by `LoraLinear`, which computes

    y = W x + B_cat (A_cat x)          (in mlx's row layout: x @ W.T + (x @ A_cat.T) @ B_cat.T)

with the stack's rank-concatenated factors (see `inference.lora.stack`). A stack is turned
into mx arrays once and cached by `stack.key`; switching persona only re-points module
attributes, so the base model is never reloaded. With no stack the original `nn.Linear`s
are put back, and the model is exactly the one `mlx_lm.generate` runs.

A request's keys and values are kept per stack after it ends (mlx-lm's `LRUPromptCache`,
the one mlx_lm.server uses, with the stack's key as its model name): the next prompt
under that stack computes only what its beginning does not share with them.
"""

from __future__ import annotations

import secrets
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlx.core as mx
import mlx.nn as nn
import msgspec
import numpy as np
from mlx_lm.generate import generate_step
from mlx_lm.models.cache import LRUPromptCache, make_prompt_cache, trim_prompt_cache
from mlx_lm.sample_utils import apply_top_p, greedy_sampler
from mlx_lm.utils import load

from inference.backends.base import ChatMessage, Finish, Sampling, StackMismatch, Token, never_cancelled
from inference.guards import Guard, RepetitionRule
from inference.lora.adapter import PARENTS
from inference.lora.stack import LoraStack
from inference.models import PROJECTIONS

if TYPE_CHECKING:
    from inference.backends.mlx_batch import MlxBatch

Factors = dict[str, tuple[mx.array, mx.array]]  # "layers.{i}.{module}" -> (A_cat.T, B_cat.T)
# What the sampler returns for non-finite logits. Still a valid index (mlx wraps negative
# indices), because generate_step feeds it to the model once before we see it.
NONFINITE = -1
BASE = ""  # the prompt cache's name for the model without a stack
_NO_GAINS = mx.zeros((0,))


class LoraLinear(nn.Module):
    """A linear layer plus the active stack's low-rank term for it."""

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        self.base = base
        self.a_t = mx.zeros((0,))
        self.b_t = mx.zeros((0,))
        self.gains = mx.zeros((0,))  # empty: one request; (rows, 1, R_U): a batch (see mlx_batch)

    def use(self, a_t: mx.array, b_t: mx.array, gains: mx.array | None = None) -> None:
        # Item assignment is what nn.Module's __setattr__ ends in for arrays (a Module is a
        # dict), without its attribute probing: a switch does this for every projection.
        self["a_t"], self["b_t"], self["gains"] = a_t, b_t, _NO_GAINS if gains is None else gains

    def __call__(self, x: mx.array) -> mx.array:
        if self.gains.size:
            return self.base(x) + ((x @ self.a_t) * self.gains) @ self.b_t
        # One fused multiply-add instead of a matmul and an add: fewer ops per token.
        return mx.addmm(self.base(x), x @ self.a_t, self.b_t)


class MlxBackend:
    """The `LocalBackend` on mlx-lm (Apple Metal, or mlx's Linux CPU/CUDA builds)."""

    name = "mlx"

    def __init__(
        self,
        model_path: Path,
        *,
        stack_cache_size: int = 8,
        prompt_cache_bytes: int = 268_435_456,
        repetition: RepetitionRule | None = None,
    ) -> None:
        path = Path(model_path)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path}: expected a model folder with config.json, found none")
        if stack_cache_size < 1:
            raise ValueError(f"stack_cache_size: expected at least 1, got {stack_cache_size}")
        self._model, self._tokenizer = load(str(path))
        self._loads = 1
        if not self._tokenizer.has_chat_template:
            raise ValueError(f"{path}: expected a tokenizer with a chat template, found none")
        # The Rust decoder directly: the same text as tokenizer.decode, a few us sooner per token.
        # Control tokens (<|im_start|>, ...) are not answer text; the torch backend drops them too.
        self._decode = partial(self._tokenizer.backend_tokenizer.decode, skip_special_tokens=True)
        self._context = self._model.args.max_position_embeddings or 0
        self._sites = _projection_sites(self._model)
        self._wrappers: dict[str, LoraLinear] = {}
        self._stacks: OrderedDict[str, Factors] = OrderedDict()
        self._stack_cache_size = stack_cache_size
        self._active: Mapping[str, tuple[mx.array, ...]] = {}
        self._repetition = repetition
        # One model, many requests: a step's graph must be built with its own stack active.
        self._lock = threading.Lock()
        # Requests arrive on several threads; the stack cache is shared (not held while decoding).
        self._cache_lock = threading.Lock()
        # One entry per stack is what a chat needs (its next turn repeats the last prompt).
        self._prompts = LRUPromptCache(max_size=stack_cache_size, max_bytes=prompt_cache_bytes)
        self._prompts_lock = threading.Lock()
        self.reused_tokens = 0  # prompt tokens not computed again, over all requests

    @property
    def loads(self) -> int:
        return self._loads

    def generate(
        self,
        messages: Sequence[ChatMessage],
        stack: LoraStack | None,
        sampling: Sampling,
        cancelled: Callable[[], bool] = never_cancelled,
    ) -> Iterator[Token | Finish]:
        """Yield Tokens, then one Finish; a bad stack or empty chat raises here, before any token."""
        factors = self._factors(stack)
        prompt = self.encode_chat(messages)
        return self._stream(prompt, stack.key if stack is not None else BASE, factors, sampling, cancelled)

    def logits(self, token_ids: Sequence[int], stack: LoraStack | None) -> np.ndarray:
        factors = self._factors(stack)
        ids = self._checked_ids(token_ids)
        with self._lock:
            self._activate(factors)
            out = self._model(mx.array([ids]))[0].astype(mx.float32)
            mx.eval(out)
        return np.array(out)

    def _stream(
        self, prompt: list[int], key: str, factors: Factors, sampling: Sampling, cancelled: Callable[[], bool]
    ) -> Iterator[Token | Finish]:
        guard = self.guard(sampling, len(prompt))
        if (overflow := guard.over_context(self._context)) is not None:
            yield overflow
            return
        cache, rest = self._restore(key, prompt)
        steps = generate_step(
            mx.array(rest), self._model, max_tokens=sampling.max_tokens, sampler=_sampler(sampling), prompt_cache=cache
        )
        fed = list(prompt)  # the ids whose keys and values the cache holds, once they are computed
        while True:
            if cancelled():
                yield guard.cancel()
                return
            # generate_step builds the graph of the token after this one inside next().
            with self._lock:
                self._activate(factors)
                token_id, _ = next(steps)
            if token_id == NONFINITE:
                yield guard.nonfinite()
                return
            fed.append(token_id)
            tokens, finish = guard.push(token_id)
            yield from tokens
            if finish is not None:
                self._store(key, fed, cache)
                yield finish
                return

    def _restore(self, key: str, prompt: list[int]) -> tuple[list[Any], list[int]]:
        """A cache holding the longest reusable beginning of `prompt` under `key`, and the ids still to compute."""
        with self._prompts_lock:
            cache, rest = self._prompts.fetch_nearest_cache(key, prompt)
        if cache is None:
            return make_prompt_cache(self._model), prompt
        if not rest:  # the whole prompt was cached: its last token runs again for the first answer token
            if trim_prompt_cache(cache, 1) != 1:
                return make_prompt_cache(self._model), prompt
            rest = prompt[-1:]
        self.reused_tokens += len(prompt) - len(rest)
        return cache, rest

    def _store(self, key: str, fed: list[int], cache: list[Any]) -> None:
        # generate_step has already queued the step of the last token, so the cache may hold it.
        with self._prompts_lock:
            self._prompts.insert_cache(key, fed[: cache[0].offset], cache)

    # --- what the batch (`mlx_batch`) uses ------------------------------------------------

    def batch(self, *, prefill_chunk: int = 256) -> MlxBatch:
        """A batch of rows decoded together, for the engine's scheduler (one per engine)."""
        from inference.backends.mlx_batch import MlxBatch

        return MlxBatch(self, prefill_chunk=prefill_chunk)

    @property
    def model(self) -> nn.Module:
        return self._model

    @property
    def dtype(self) -> mx.Dtype:
        return next(iter(self._sites.values()))[2].weight.dtype

    @property
    def context(self) -> int:
        return self._context

    @property
    def lock(self) -> threading.Lock:
        return self._lock

    def stack_factors(self, stack: LoraStack | None) -> Factors:
        return self._factors(stack)

    def activate_factors(self, factors: Mapping[str, tuple[mx.array, ...]]) -> None:
        """(the lock held) Point the projections at a stack's factors or a batch's union."""
        self._activate(factors)

    def guard(self, sampling: Sampling, prompt_tokens: int) -> Guard:
        return Guard(sampling, self._decode, self._tokenizer.eos_token_ids, prompt_tokens, self._repetition)

    @staticmethod
    def sampler(sampling: Sampling) -> Callable[[mx.array], mx.array]:
        return _sampler(sampling)

    @staticmethod
    def prompt_key(stack: LoraStack | None) -> str:
        return stack.key if stack is not None else BASE

    def restore(self, key: str, prompt: list[int]) -> tuple[list[Any], list[int]]:
        return self._restore(key, prompt)

    def store(self, key: str, fed: list[int], cache: list[Any]) -> None:
        self._store(key, fed, cache)

    # --- helpers the engine, CLI and benchmark share (as on the torch backend) -------------

    def activate(self, stack: LoraStack | None) -> None:
        """Point the model at `stack` (None: the plain base) between requests; cheap once cached."""
        factors = self._factors(stack)
        with self._lock:
            self._activate(factors)

    def encode_chat(self, messages: Sequence[ChatMessage]) -> list[int]:
        """The prompt ids: the tokenizer's chat template with the assistant turn opened."""
        if not messages:
            raise ValueError("messages: expected at least one message, got none")
        chat = [msgspec.structs.asdict(message) for message in messages]
        return list(self._tokenizer.apply_chat_template(chat, add_generation_prompt=True))

    def _checked_ids(self, token_ids: Sequence[int]) -> list[int]:
        ids = [int(i) for i in token_ids]
        vocab = self._model.args.vocab_size
        if not ids:
            raise ValueError("token_ids: expected at least one token id, got none")
        bad = [i for i in ids if not 0 <= i < vocab]
        if bad:
            raise ValueError(f"token_ids: expected ids in 0..{vocab - 1}, got {bad[0]}")
        return ids

    # --- stacks ------------------------------------------------------------------------

    def _factors(self, stack: LoraStack | None) -> Factors:
        if stack is None:
            return {}
        with self._cache_lock:
            cached = self._stacks.get(stack.key)
            if cached is not None:
                self._stacks.move_to_end(stack.key)
                return cached
            factors = self._convert(stack)
            self._stacks[stack.key] = factors
            if len(self._stacks) > self._stack_cache_size:
                self._stacks.popitem(last=False)
            return factors

    def _convert(self, stack: LoraStack) -> Factors:
        factors: Factors = {}
        for key, (a, b) in stack.modules.items():
            site = self._sites.get(key)
            if site is None:
                raise StackMismatch(
                    f"stack {stack.key[:12]}: expected modules layers.<0..{len(self._model.layers) - 1}>."
                    f"<{'|'.join(PROJECTIONS)}>, got {key!r}"
                )
            base = site[2]
            out_features, in_features = base.weight.shape
            if a.ndim != 2 or b.ndim != 2 or a.shape[1] != in_features or b.shape != (out_features, a.shape[0]):
                raise StackMismatch(
                    f"stack {stack.key[:12]}: {key}: expected A (R, {in_features}) and B ({out_features}, R), "
                    f"got {a.shape} and {b.shape}"
                )
            if not (np.isfinite(a).all() and np.isfinite(b).all()):
                raise StackMismatch(f"stack {stack.key[:12]}: {key}: expected finite factors, got NaN or Inf")
            # Transposed once here so each step is two plain row-major matmuls.
            dtype = base.weight.dtype
            factors[key] = (mx.array(a.T).astype(dtype), mx.array(b.T).astype(dtype))
        mx.eval(factors)
        return factors

    def _activate(self, factors: Mapping[str, tuple[mx.array, ...]]) -> None:
        """Point every targeted projection at `factors` (with a batch's gains, if given); put
        the plain linears back elsewhere."""
        if factors is self._active:
            return
        for key in self._active.keys() - factors.keys():
            parent, attr, base = self._sites[key]
            setattr(parent, attr, base)
        for key, arrays in factors.items():
            parent, attr, base = self._sites[key]
            wrapper = self._wrappers.get(key)
            if wrapper is None:
                wrapper = self._wrappers[key] = LoraLinear(base)
            wrapper.use(*arrays)
            if parent.get(attr) is not wrapper:
                setattr(parent, attr, wrapper)
        self._active = factors


def _projection_sites(model: nn.Module) -> dict[str, tuple[nn.Module, str, nn.Module]]:
    """"layers.{i}.{module}" -> (parent module, attribute name, the original linear)."""
    sites = {}
    for index, block in enumerate(model.layers):
        for module in PROJECTIONS:
            parent = getattr(block, PARENTS[module])
            sites[f"layers.{index}.{module}"] = (parent, module, getattr(parent, module))
    return sites


def _sampler(sampling: Sampling) -> Callable[[mx.array], mx.array]:
    """mlx-lm's greedy or top-p sampling, with its own seeded key and a non-finite check."""
    if sampling.greedy:
        pick = greedy_sampler
    else:
        # A key per request (not mx.random's global state): the same seed gives the same
        # tokens whatever else runs in the process.
        key = mx.random.key(sampling.seed if sampling.seed is not None else secrets.randbits(63))
        inverse_temperature = 1.0 / sampling.temperature

        def pick(logprobs: mx.array) -> mx.array:
            nonlocal key
            key, step_key = mx.random.split(key)
            if sampling.top_p < 1.0:
                logprobs = apply_top_p(logprobs, sampling.top_p)
            return mx.random.categorical(logprobs * inverse_temperature, key=step_key)

    def guarded(logprobs: mx.array) -> mx.array:
        # Decided inside the lazy graph: no extra synchronisation per token.
        # int32: mlx's samplers return uint32, where -1 would wrap to an id past the vocabulary.
        return mx.where(mx.isfinite(logprobs).all(), pick(logprobs).astype(mx.int32), NONFINITE)

    return guarded

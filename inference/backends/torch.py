"""transformers backend (CUDA, ROCm, MPS or CPU): one base model in memory, LoRA stacks swapped per request.

Each projection a stack targets is replaced, for that request, by a `LoraLinear` computing

    y = W x + B_cat (A_cat x)        (F.linear(x, W) + F.linear(F.linear(x, A_cat), B_cat))

with the stack's rank-concatenated factors (see `inference.lora.stack`). A stack becomes
device tensors once and is cached by `stack.key`. Switching persona re-points module
attributes and never reloads the base; with no stack the original `nn.Linear`s are put
back, so the model is exactly the one plain `generate` runs and costs nothing extra.

On CPU in fp32, a stack runs every linear layer (and the output head) on weights that
oneDNN has laid out for its own matmul (`PackedLinear`): the dozen new tokens of a
persona's next prompt compute about 1.4x faster than with MKL's `F.linear` on the same
weights. The packed copy is made once, at the first stack, and shared by all stacks; it
costs one more copy of the linear weights in memory. The plain base keeps the original
layers, so its logits stay bit-identical to transformers'; a stack's differ from its
maths by fp32 rounding only (well within 1e-4).
"""

from __future__ import annotations

import re
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from inference.backends.base import ChatMessage, Finish, Sampling, StackMismatch, Token, never_cancelled
from inference.guards import Guard, RepetitionRule
from inference.lora.adapter import PARENTS
from inference.lora.stack import LoraStack
from inference.models import PROJECTIONS

if TYPE_CHECKING:
    from inference.backends.torch_batch import TorchBatch, Union

Factors = dict[str, tuple[torch.Tensor, torch.Tensor]]  # "layers.{i}.{module}" -> (A_cat, B_cat)
_HEAD = "lm_head"  # the output projection's key among a stack's layers
_MODULE_KEY = re.compile(r"layers\.(0|[1-9][0-9]*)\.(\w+)")


def pick_device(requested: str = "auto") -> str:
    """"auto": cuda (ROCm builds answer to it too), then mps, then cpu."""
    if requested != "auto":
        return requested
    if torch.cuda.is_available():
        return "cuda"
    if torch.backends.mps.is_available():
        return "mps"
    return "cpu"


class LoraLinear(nn.Module):
    """A linear layer (plain or packed) plus the active stack's low-rank term for it.

    One request: a = A_cat, b = B_cat (already scaled), no gains. A batch of rows with
    different stacks: a = A_U, b = B_U and per-row gains G (rows, 1, R_U), see `torch_batch`.
    """

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        self.base = base
        self.a = torch.empty(0)
        self.b = torch.empty(0)
        self.gains: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        low = F.linear(x, self.a)
        if self.gains is not None:
            low = low * self.gains
        return self.base(x) + F.linear(low, self.b)


class PackedLinear(nn.Module):
    """`linear` on a copy of its weight in oneDNN's blocked layout (CPU, fp32, inference only)."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        # No batch-size hint: the layout oneDNN picks then serves one token and whole prompts alike.
        self.weight = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), None)
        self.bias = None if linear.bias is None else linear.bias.detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")


def can_pack(device: str, dtype: torch.dtype) -> bool:
    """Whether this torch build can run `PackedLinear` for a model on `device` in `dtype`."""
    return device == "cpu" and dtype == torch.float32 and torch.backends.mkldnn.is_available()


class PromptCache:
    """The keys and values of the last prompt run under each stack, bounded by bytes.

    A chat's next prompt repeats the last one's beginning (system prompt, earlier turns),
    so only the rest is computed. The entries are keyed by stack: a LoRA on q/k/v changes
    every key and value after the first block. Stored tensors are never written again
    (the cache only ever concatenates into new ones), so keeping references is enough.
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._entries: OrderedDict[str | None, tuple[list[int], list[tuple[torch.Tensor, torch.Tensor]], int]] = (
            OrderedDict()
        )
        self._bytes = 0
        self.reused_tokens = 0  # prompt tokens not computed again, over all requests

    def restore(self, key: str | None, ids: list[int], cache: object) -> int:
        """Fill `cache` with the longest reusable beginning of `ids`; return its length."""
        found = self._entries.get(key)
        if found is None:
            return 0
        previous, layers, _ = found
        same = next((i for i, (a, b) in enumerate(zip(previous, ids, strict=False)) if a != b), min(len(previous), len(ids)))
        # The prompt's last token always runs: its logits give the first answer token.
        reuse = min(same, len(ids) - 1)
        if reuse > 0:
            self.reused_tokens += reuse
            self._entries.move_to_end(key)
            for index, (keys, values) in enumerate(layers):
                cache.update(keys[..., :reuse, :], values[..., :reuse, :], index)  # type: ignore[attr-defined]
        return reuse

    def store(self, key: str | None, ids: list[int], cache: object) -> None:
        layers = [(layer.keys, layer.values) for layer in cache.layers]  # type: ignore[attr-defined]
        size = sum(k.nbytes + v.nbytes for k, v in layers)
        if key in self._entries:
            self._bytes -= self._entries.pop(key)[2]
        if size > self.max_bytes:
            return
        self._entries[key] = (list(ids), layers, size)
        self._bytes += size
        while self._bytes > self.max_bytes:
            self._bytes -= self._entries.popitem(last=False)[1][2]


class TorchBackend:
    """A transformers causal LM loaded once; `generate` and `logits` take any LoRA stack."""

    name = "torch"

    def __init__(
        self,
        folder: Path,
        *,
        device: str = "auto",
        dtype: torch.dtype | None = None,
        stack_cache_size: int = 16,
        prompt_cache_bytes: int = 268_435_456,
        repetition: RepetitionRule | None = None,
    ) -> None:
        self.folder = Path(folder)
        self.device = pick_device(device)
        # fp32 on CPU (exact and fastest there); half precision where a GPU makes it pay.
        self.dtype = dtype or (torch.float32 if self.device == "cpu" else torch.bfloat16)
        self._stack_cache_size = stack_cache_size
        self._repetition = repetition
        self.lock = threading.Lock()  # held around every forward pass
        self._converted: OrderedDict[str, Factors] = OrderedDict()
        self._active: str | Union | None = None  # a stack's key, or a batch's union
        self._packed: dict[str, nn.Module] | None = None  # made at the first stack: see `_stack_layers`
        self.prompt_cache = PromptCache(prompt_cache_bytes)
        self._loads = 0
        self._load()

    @property
    def loads(self) -> int:
        return self._loads

    def _load(self) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self._tokenizer = AutoTokenizer.from_pretrained(self.folder)
        model = AutoModelForCausalLM.from_pretrained(self.folder, dtype=self.dtype).to(self.device)
        self._model = model.eval()
        self._loads += 1
        # Where each projection lives, so a stack is applied by re-pointing one attribute.
        self._slots: dict[str, tuple[nn.Module, str, nn.Linear, LoraLinear]] = {}
        for index, block in enumerate(model.model.layers):
            for module in PROJECTIONS:
                parent = getattr(block, PARENTS[module])
                linear = getattr(parent, module)
                self._slots[f"layers.{index}.{module}"] = (parent, module, linear, LoraLinear(linear))
        self._head = model.get_output_embeddings()
        eos = model.generation_config.eos_token_id
        eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if self._tokenizer.eos_token_id is not None:
            eos_ids.add(self._tokenizer.eos_token_id)
        self._eos = frozenset(eos_ids)
        self.context = int(getattr(model.config, "max_position_embeddings", 0) or 0)

    # --- the protocol -------------------------------------------------------------------

    def generate(
        self,
        messages: Sequence[ChatMessage],
        stack: LoraStack | None,
        sampling: Sampling,
        cancelled: Callable[[], bool] = never_cancelled,
    ) -> Iterator[Token | Finish]:
        """Yield Tokens, then one Finish; a stack that does not fit raises here, before any token."""
        if stack is not None:
            self.check_stack(stack)
        ids = self.encode_chat(messages)
        return self._stream(ids, stack, sampling, cancelled)

    def logits(self, token_ids: Sequence[int], stack: LoraStack | None) -> np.ndarray:
        with self.lock:
            self.activate_locked(stack)
            with torch.inference_mode():
                out = self._model(input_ids=torch.tensor([list(token_ids)], device=self.device)).logits[0]
            return out.float().cpu().numpy()

    def batch(self, *, prefill_chunk: int = 256) -> TorchBatch:
        """A batch of rows decoded together, for the engine's scheduler (one per engine)."""
        from inference.backends.torch_batch import TorchBatch

        return TorchBatch(self, prefill_chunk=prefill_chunk)

    # --- helpers the engine, the batch, CLI and benchmark share -----------------------------

    def encode_chat(self, messages: Sequence[ChatMessage]) -> list[int]:
        """The prompt ids: the tokenizer's chat template with the assistant turn opened."""
        chat = [{"role": m.role, "content": m.content} for m in messages]
        text = self._tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
        # The template already writes the special tokens; adding them again would double BOS.
        return self._tokenizer.encode(text, add_special_tokens=False)

    # --- decoding -----------------------------------------------------------------------

    def _stream(
        self, ids: list[int], stack: LoraStack | None, sampling: Sampling, cancelled: Callable[[], bool]
    ) -> Iterator[Token | Finish]:
        guard = self.guard(sampling, len(ids))
        if (overflow := guard.over_context(self.context)) is not None:
            yield overflow
            return
        with self.lock:
            self.activate_locked(stack)
            yield from self._decode_loop(ids, stack.key if stack else None, sampling, guard, cancelled)

    def _decode_loop(
        self, ids: list[int], key: str | None, sampling: Sampling, guard: Guard, cancelled: Callable[[], bool]
    ) -> Iterator[Token | Finish]:
        from transformers import DynamicCache

        cache = DynamicCache(config=self.config)
        reused = self.prompt_cache.restore(key, ids, cache)
        generator = self.generator(sampling.seed)
        inputs = torch.tensor([ids[reused:]], device=self.device)
        prefill = True
        while True:
            if cancelled():
                yield guard.cancel()
                return
            logits = self.step(inputs, cache)
            if not bool(torch.isfinite(logits).all()):
                yield guard.nonfinite()
                return
            if prefill:
                self.prompt_cache.store(key, ids, cache)
                prefill = False
            token_id = sample_token(logits, sampling, generator)
            tokens, finish = guard.push(token_id)
            yield from tokens
            if finish is not None:
                yield finish
                return
            inputs = torch.tensor([[token_id]], device=self.device)

    @property
    def config(self) -> object:
        return self._model.config

    def guard(self, sampling: Sampling, prompt_tokens: int) -> Guard:
        return Guard(sampling, self._decode, self._eos, prompt_tokens, self._repetition)

    @torch.inference_mode()
    def step(self, inputs: torch.Tensor, cache: object) -> torch.Tensor:
        """One forward pass of one row (the lock held): the last position's logits."""
        # logits_to_keep=1: only the last position's logits, as `generate` does; the prompt's
        # full (len, vocab) logits would cost more than the whole prefill.
        out = self._model(input_ids=inputs, past_key_values=cache, use_cache=True, logits_to_keep=1)
        return out.logits[0, -1].float()

    @torch.inference_mode()
    def step_batch(
        self, inputs: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache: object
    ) -> torch.Tensor:
        """One decode step of left-padded rows (the lock held): (rows, vocab) logits."""
        out = self._model(
            input_ids=inputs, attention_mask=mask, position_ids=positions,
            past_key_values=cache, use_cache=True, logits_to_keep=1,
        )  # fmt: skip
        return out.logits[:, -1].float()

    def generator(self, seed: int | None) -> torch.Generator:
        generator = torch.Generator(device=self.device)
        if seed is None:
            generator.seed()
        else:
            generator.manual_seed(seed)
        return generator

    def _decode(self, ids: Sequence[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=True)

    # --- stacks -------------------------------------------------------------------------

    def activate(self, stack: LoraStack | None) -> None:
        """Point the model at `stack` (None: the plain base) between requests; a no-op when it is active."""
        with self.lock:
            self.activate_locked(stack)

    def activate_locked(self, stack: LoraStack | None) -> None:
        key = stack.key if stack is not None else None
        if key == self._active:
            return
        factors = self._factors(stack) if stack is not None else {}
        self._point({name: (a, b, None) for name, (a, b) in factors.items()}, packed=stack is not None)
        self._active = key

    def activate_union_locked(self, union: Union) -> None:
        """Point the model at a batch's union of layers, each row weighted by its gains."""
        if self._active is union:
            return
        self._point(union.modules, packed=bool(union.modules))
        self._active = union

    def _point(self, factors: Mapping[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]], *, packed: bool) -> None:
        layers = self._stack_layers() if packed else {}
        for name, (parent, attr, linear, lora) in self._slots.items():
            if name in factors:
                lora.a, lora.b, lora.gains = factors[name]
                target: nn.Module = lora
            else:
                target = layers.get(name, linear)
            if getattr(parent, attr) is not target:
                setattr(parent, attr, target)
        head = layers.get(_HEAD, self._head)
        if self._model.get_output_embeddings() is not head:
            self._model.set_output_embeddings(head)

    def _stack_layers(self) -> dict[str, nn.Module]:
        """What stacks run on instead of the plain linears: packed copies, or none where unavailable."""
        if self._packed is None:
            self._packed = {}
            if can_pack(self.device, self.dtype):
                for name, (_, _, linear, lora) in self._slots.items():
                    lora.base = self._packed[name] = PackedLinear(linear)
                self._packed[_HEAD] = PackedLinear(self._head)
        return self._packed

    def check_stack(self, stack: LoraStack) -> None:
        """Raise `StackMismatch` unless every module of `stack` fits this model."""
        self._factors(stack)

    def _factors(self, stack: LoraStack) -> Factors:
        if stack.key in self._converted:
            self._converted.move_to_end(stack.key)
            return self._converted[stack.key]
        factors = {}
        for name, (a, b) in stack.modules.items():
            linear = self._check_fits(name, a, b)
            factors[name] = (
                torch.from_numpy(np.array(a)).to(self.device, linear.weight.dtype),
                torch.from_numpy(np.array(b)).to(self.device, linear.weight.dtype),
            )
        self._converted[stack.key] = factors
        if len(self._converted) > self._stack_cache_size:
            self._converted.popitem(last=False)
        return factors

    def _check_fits(self, name: str, a: np.ndarray, b: np.ndarray) -> nn.Linear:
        if name not in self._slots:
            match = _MODULE_KEY.fullmatch(name)
            detail = (
                f"the model has {len(self._slots) // len(PROJECTIONS)} blocks"
                if match and match.group(2) in PROJECTIONS
                else f"expected 'layers.<i>.<module>' with a module among {', '.join(PROJECTIONS)}"
            )
            raise StackMismatch(f"stack module {name!r} is not in {self.folder.name}: {detail}")
        linear = self._slots[name][2]
        expected = (linear.in_features, linear.out_features)
        if (a.shape[1], b.shape[0]) != expected:
            raise StackMismatch(
                f"stack module {name!r}: expected (in, out) = {expected} for {self.folder.name}, "
                f"got A {a.shape} and B {b.shape}"
            )
        return linear


def sample_token(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator) -> int:
    """One token id from one row's (vocab,) logits, drawn with that row's own generator."""
    if sampling.greedy:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits / sampling.temperature, dim=-1)
    if sampling.top_p < 1.0:
        # Nucleus: keep the smallest set of most likely tokens whose mass reaches top_p
        # (a token stays if the mass before it is still below top_p).
        sorted_probs, order = torch.sort(probs, descending=True)
        before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
        sorted_probs[before >= sampling.top_p] = 0.0
        choice = torch.multinomial(sorted_probs, 1, generator=generator)
        return int(order[choice])
    return int(torch.multinomial(probs, 1, generator=generator))

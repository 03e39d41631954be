"""What every local backend does with each sampled token, in one place.

A backend samples token ids; `Guard.push` turns them into `Token`s and decides when the
request ends: end-of-sequence, a stop string (never emitted), `max_tokens`, or a
repetition loop. `Guard.nonfinite` and `Guard.cancel` give the other endings, so torch
and mlx end requests with the same reasons and messages.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Collection, Sequence

import msgspec

from inference.backends.base import Finish, FinishReason, Sampling, Token

Decode = Callable[[Sequence[int]], str]
REPLACEMENT = "\ufffd"  # what a decoder returns for an incomplete UTF-8 sequence


class RepetitionRule(msgspec.Struct, frozen=True, kw_only=True):
    """A loop is a period-p cycle (p <= max_period) repeated min_repeats times, spanning min_span tokens or more."""

    max_period: int = 64
    min_repeats: int = 4
    min_span: int = 64


class Detokenizer:
    """Incremental decoding: the text each new token adds, held back while a character is incomplete."""

    # Decoding only the new ids loses context (a leading space, a multi-byte character split
    # over two tokens), so each step decodes from `_prefix` and emits the part past `_read`.
    def __init__(self, decode: Decode) -> None:
        self._decode = decode
        self._ids: list[int] = []
        self._prefix = 0
        self._read = 0

    def push(self, token_id: int) -> str:
        self._ids.append(token_id)
        before = self._decode(self._ids[self._prefix : self._read])
        after = self._decode(self._ids[self._prefix :])
        if len(after) <= len(before) or after.endswith(REPLACEMENT):
            return ""
        self._prefix, self._read = self._read, len(self._ids)
        return after[len(before) :]


class StopMatcher:
    """Cuts the text at the first stop string; holds back a tail that could still start one."""

    def __init__(self, stops: Sequence[str]) -> None:
        self._stops = tuple(stops)
        self._pending = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """(text safe to emit now, whether a stop string was reached)."""
        buffer = self._pending + text
        hits = [index for stop in self._stops if (index := buffer.find(stop)) >= 0]
        if hits:
            self._pending = ""
            return buffer[: min(hits)], True
        # Every suffix that is a prefix of a stop lies inside the longest such suffix,
        # so holding that one back is enough for a stop split across tokens.
        hold = max(
            (k for stop in self._stops for k in range(1, min(len(stop) - 1, len(buffer)) + 1) if buffer.endswith(stop[:k])),
            default=0,
        )
        self._pending = buffer[len(buffer) - hold :]
        return buffer[: len(buffer) - hold], False

    def flush(self) -> str:
        text, self._pending = self._pending, ""
        return text


class RepetitionDetector:
    """Detects a token loop in O(max_period) per token."""

    # runs[p] counts how many of the latest tokens each equal the token p positions
    # before them; then the last runs[p] + p tokens are periodic with period p.
    def __init__(self, rule: RepetitionRule) -> None:
        self._rule = rule
        self._history: deque[int] = deque(maxlen=rule.max_period)
        self._runs = [0] * (rule.max_period + 1)
        # The loop length each period must reach; fixed per rule, so worked out once.
        self._spans = [0] + [max(period * rule.min_repeats, rule.min_span) for period in range(1, rule.max_period + 1)]

    def push(self, token_id: int) -> bool:
        history, runs, spans = self._history, self._runs, self._spans
        looped = False
        for period in range(1, len(runs)):
            runs[period] = runs[period] + 1 if len(history) >= period and history[-period] == token_id else 0
            looped = looped or runs[period] + period >= spans[period]
        history.append(token_id)
        return looped


class Guard:
    """Turns one request's sampled ids into Tokens and exactly one Finish."""

    def __init__(
        self,
        sampling: Sampling,
        decode: Decode,
        eos_ids: Collection[int],
        prompt_tokens: int,
        repetition: RepetitionRule | None = None,
    ) -> None:
        self._max_tokens = sampling.max_tokens
        self._eos = frozenset() if sampling.ignore_eos else frozenset(eos_ids)
        self._prompt_tokens = prompt_tokens
        self._detokenizer = Detokenizer(decode)
        self._stops = StopMatcher(sampling.stop)
        self._repetition = RepetitionDetector(repetition or RepetitionRule())
        self.completion_tokens = 0

    def push(self, token_id: int) -> tuple[list[Token], Finish | None]:
        """The Tokens to emit for one sampled id, and the Finish if the request ends here."""
        self.completion_tokens += 1
        if token_id in self._eos:
            return self._flushed(token_id), self._finish("stop")
        text, stopped = self._stops.feed(self._detokenizer.push(token_id))
        tokens = [Token(text, token_id)] if text else []
        if stopped:
            return tokens, self._finish("stop")
        if self._repetition.push(token_id):
            return tokens, self._finish("repetition")
        if self.completion_tokens >= self._max_tokens:
            return tokens + self._flushed(token_id), self._finish("length")
        return tokens, None

    def events(self, token_id: int) -> list[Token | Finish]:
        """`push`, as the list of events to send: the Tokens, then the Finish if it ends here."""
        tokens, finish = self.push(token_id)
        return [*tokens, finish] if finish is not None else tokens

    def nonfinite(self) -> Finish:
        """The ending for NaN or Inf in the logits (a broken adapter or overflowing weights)."""
        step = self.completion_tokens + 1
        return self.error(f"non-finite logits (NaN or Inf) at generated token {step}")

    def error(self, message: str) -> Finish:
        return self._finish("error", message)

    def over_context(self, context: int) -> Finish | None:
        """The ending for a request that cannot fit the model's context (0: unknown, never)."""
        # Past the trained context RoPE positions are extrapolated and the answer degrades.
        if not context or self._prompt_tokens + self._max_tokens <= context:
            return None
        return self.error(
            f"prompt of {self._prompt_tokens} tokens plus max_tokens {self._max_tokens} "
            f"exceeds the model's context of {context}"
        )

    def cancel(self) -> Finish:
        return self._finish("cancelled")

    def _flushed(self, token_id: int) -> list[Token]:
        # Held-back text that never became a stop string is part of the answer.
        text = self._stops.flush()
        return [Token(text, token_id)] if text else []

    def _finish(self, reason: FinishReason, error: str | None = None) -> Finish:
        return Finish(reason, self._prompt_tokens, self.completion_tokens, error)

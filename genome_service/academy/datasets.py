"""Users' training data: chat-format JSONL (OpenAI's fine-tuning format), checked line by line.

Each line is one ``{"messages": [{"role": ..., "content": ...}, ...]}``: system, user and
assistant turns, at least one assistant turn, the last turn the assistant's (what the layer
learns to say). A file that breaks a rule is refused whole, naming the first line that broke
it and the rule, so nothing half-checked is stored or trained on.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence

import msgspec

from genome_service.domain.common import DomainError

ROLES = ("system", "user", "assistant")
MAX_LINES = 100_000


class DatasetRejected(DomainError):
    """The file breaks `rule` at `line` (1-based; 0: the file as a whole)."""

    def __init__(self, rule: str, line: int, message: str) -> None:
        super().__init__(rule, f"line {line}: {message}" if line else message)
        self.line = line


class ChatTurn(msgspec.Struct, frozen=True, forbid_unknown_fields=False):
    role: str
    content: str
    # OpenAI's per-turn switch: 0 keeps an assistant turn out of the loss. Only the last turn
    # is trained on here, so an earlier one's weight changes nothing.
    weight: int | None = None


class ChatLine(msgspec.Struct, frozen=True, forbid_unknown_fields=False):
    messages: tuple[ChatTurn, ...]


class ChatDataset(msgspec.Struct, frozen=True):
    examples: tuple[ChatLine, ...]
    sha256: str
    bytes: int


def parse_chat_jsonl(
    data: bytes, *, max_bytes: int, count_tokens: Callable[[Sequence[ChatTurn]], int] | None = None, max_tokens: int = 0,
) -> ChatDataset:
    """The file's examples, or `DatasetRejected` at its first fault.

    `count_tokens` (with `max_tokens`, the model's context) refuses a line the model could not
    read whole: training would cut its answer short without saying so."""
    if len(data) > max_bytes:
        raise DatasetRejected("file_too_large", 0, f"the file is {len(data)} bytes, over the limit of {max_bytes}")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise DatasetRejected("line_not_utf8", line, "not UTF-8 text") from None
    lines = text.splitlines()
    if len(lines) > MAX_LINES:
        raise DatasetRejected("too_many_lines", 0, f"the file has {len(lines)} lines, over the limit of {MAX_LINES}")
    examples = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue  # a blank line (a trailing newline, a spacer) holds no example
        example = _line(number, line)
        if count_tokens is not None and max_tokens and (tokens := count_tokens(example.messages)) > max_tokens:
            raise DatasetRejected("line_too_long", number,
                                  f"{tokens} tokens, longer than the model's context of {max_tokens}")
        examples.append(example)
    if not examples:
        raise DatasetRejected("file_empty", 0, "the file holds no example: one JSON object per line is expected")
    return ChatDataset(tuple(examples), hashlib.sha256(data).hexdigest(), len(data))


def _line(number: int, line: str) -> ChatLine:
    try:
        raw = msgspec.json.decode(line)
    except msgspec.DecodeError as exc:
        raise DatasetRejected("line_not_json", number, f"not JSON ({exc})") from None
    if not isinstance(raw, dict):
        raise DatasetRejected("line_not_object", number, f"expected a JSON object, got {type(raw).__name__}")
    messages = raw.get("messages")
    if not isinstance(messages, list) or not messages:
        raise DatasetRejected("messages_missing", number, 'expected {"messages": [...]} with at least one message')
    for turn, message in enumerate(messages, start=1):
        if not isinstance(message, dict) or "role" not in message:
            raise DatasetRejected("role_missing", number, f"message {turn} has no role")
        role = message["role"]
        if role not in ROLES:
            raise DatasetRejected("role_unknown", number,
                                  f"message {turn} has role {role!r}; expected one of {', '.join(ROLES)}")
        content = message.get("content")
        if not isinstance(content, str) or not content.strip():
            raise DatasetRejected("content_missing", number, f"message {turn} ({role}) has no text content")
    if messages[-1]["role"] != "assistant":
        rule = "no_assistant_turn" if all(m["role"] != "assistant" for m in messages) else "last_turn_not_assistant"
        raise DatasetRejected(rule, number, "the last message must be the assistant's: the answer the layer learns")
    if len(messages) < 2 or all(m["role"] == "assistant" for m in messages):
        raise DatasetRejected("no_prompt_turn", number, "an assistant answer needs a system or user message before it")
    try:
        return msgspec.convert(raw, ChatLine)
    except msgspec.ValidationError as exc:
        raise DatasetRejected("line_malformed", number, str(exc)) from None

"""Token counts for a chat prompt, as the model's own tokenizer and chat template give them.

transformers' tokenizer classes import libtorch (hundreds of megabytes mapped into every API
process); the `tokenizers` library and a sandboxed Jinja environment configured as
transformers configures it give the same text and the same ids without it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from inference.backends.base import ChatMessage


def _raise(message: str) -> NoReturn:
    raise ValueError(message)


class ChatTokenizer:
    def __init__(self, folder: Path) -> None:
        from jinja2.ext import loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment
        from tokenizers import Tokenizer

        folder = Path(folder)
        self._tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        config: dict[str, Any] = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
        template_file = folder / "chat_template.jinja"
        template = template_file.read_text(encoding="utf-8") if template_file.is_file() else config.get("chat_template")
        if not isinstance(template, str):
            raise ValueError(f"{folder}: expected a chat template (chat_template.jinja or tokenizer_config.json), found none")
        environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
        environment.globals["raise_exception"] = _raise
        self._template = environment.from_string(template)
        self._special = {key: _token_text(config.get(key)) for key in ("bos_token", "eos_token", "pad_token", "unk_token")}

    def prompt_text(self, messages: Sequence[ChatMessage]) -> str:
        chat = [{"role": m.role, "content": m.content} for m in messages]
        return self._template.render(messages=chat, add_generation_prompt=True, **self._special)

    def count_prompt(self, messages: Sequence[ChatMessage]) -> int:
        return self.count_text(self.prompt_text(messages))

    def count_text(self, text: str) -> int:
        return len(self._tokenizer.encode(text, add_special_tokens=False).ids)


def _token_text(token: object) -> str:
    # Older configs spell a special token as {"content": "<s>", ...}.
    if isinstance(token, dict):
        return str(token.get("content", ""))
    return token if isinstance(token, str) else ""

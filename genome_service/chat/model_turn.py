"""A fine-tuned model's turn (`ft:<base>:<suffix>:<layer id>`): a base model plus one layer, no persona.

It is what OpenAI's fine-tuned models are: the client sends the whole chat, its own
system prompt included, and nothing is recorded (there is no persona to hold a
conversation). Refusals are raised before the first token, as a persona's turn does.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import aclosing

from genome_service.chat.runtime import ChatRuntime
from genome_service.chat.turn import CLEAN_ENDS, ChatRefused, Reply, engine_events
from genome_service.domain.conversation import Generation, SamplingUsed, Usage
from genome_service.settings import Settings
from inference.backends.base import ChatMessage, Sampling, Token
from inference.lora.stack import stack_key

LAYER_WEIGHT = 1.0


async def run_model_turn(
    settings: Settings, runtime: ChatRuntime, base_model: str, layer_id: str, messages: list[ChatMessage], *,
    max_tokens: int | None, temperature: float, top_p: float, seed: int | None, label: str,
) -> AsyncIterator[Token | Reply]:
    """Yield the answer's Tokens, then one Reply (its conversation id empty: nothing is recorded)."""
    max_tokens = settings.chat_default_max_tokens if max_tokens is None else max_tokens
    if not 1 <= max_tokens <= settings.chat_max_tokens_limit:
        raise ChatRefused(422, "max_tokens_out_of_range", f"max_tokens must be within 1..{settings.chat_max_tokens_limit} (got {max_tokens})")
    if not messages or messages[-1].role != "user":
        raise ChatRefused(422, "last_message_not_user", "the last message must be the user's")
    try:
        sampling = Sampling(temperature=temperature, top_p=top_p, max_tokens=max_tokens, seed=seed)
    except ValueError as error:
        raise ChatRefused(422, "sampling_out_of_range", str(error)) from None
    loaded = await runtime.ready(base_model)
    prompt_tokens = loaded.count_prompt(messages)
    if prompt_tokens + max_tokens > loaded.context:
        raise ChatRefused(422, "prompt_too_long", f"the prompt ({prompt_tokens} tokens) and max_tokens ({max_tokens}) "
                                                  f"exceed the model's context of {loaded.context}")
    layers = [(layer_id, LAYER_WEIGHT)]
    stack = loaded.resolver.stack(layers)
    parts: list[str] = []
    async with aclosing(engine_events(loaded, messages, stack, sampling, label)) as stream:
        async for event in stream:
            if isinstance(event, Token):
                parts.append(event.text)
                yield event
                continue
            generation = Generation(
                model=loaded.model, stack_hash=stack_key(layers),
                sampling=SamplingUsed(sampling.temperature, sampling.top_p, sampling.max_tokens, sampling.seed),
                usage=Usage(event.prompt_tokens or prompt_tokens, event.completion_tokens),
                finish_reason=event.reason, citations=(),
            )
            failure = None
            if event.reason not in CLEAN_ENDS:
                failure = ChatRefused(503, event.rule or "generation_failed", event.error or event.reason)
            yield Reply("", "".join(parts), generation, failure, event.worker_pid)

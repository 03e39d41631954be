"""Chat JSONL training files: each rule refused with its line number, good files read whole."""

from __future__ import annotations

import json

import pytest

from genome_service.academy.datasets import DatasetRejected, parse_chat_jsonl

GOOD = {"messages": [{"role": "system", "content": "Be calm."}, {"role": "user", "content": "Hi"},
                     {"role": "assistant", "content": "Hello."}]}


def jsonl(*lines: object) -> bytes:
    return "\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines).encode()


def test_a_good_file_gives_every_example_and_its_digest() -> None:
    dataset = parse_chat_jsonl(jsonl(GOOD, "", GOOD) + b"\n", max_bytes=10_000)
    assert len(dataset.examples) == 2 and dataset.bytes == len(jsonl(GOOD, "", GOOD)) + 1
    assert [t.role for t in dataset.examples[0].messages] == ["system", "user", "assistant"]
    assert len(dataset.sha256) == 64


@pytest.mark.parametrize(("line", "rule"), [
    ("{not json", "line_not_json"),
    ("[1, 2]", "line_not_object"),
    ({"prompt": "old format"}, "messages_missing"),
    ({"messages": [{"content": "Hi"}, {"role": "assistant", "content": "Hello."}]}, "role_missing"),
    ({"messages": [{"role": "tool", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]}, "role_unknown"),
    ({"messages": [{"role": "user", "content": "Hi"}, {"role": "user", "content": "Anyone?"}]}, "no_assistant_turn"),
    ({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"},
                   {"role": "user", "content": "And?"}]}, "last_turn_not_assistant"),
    ({"messages": [{"role": "assistant", "content": "Hello."}]}, "no_prompt_turn"),
    ({"messages": [{"role": "user", "content": ""}, {"role": "assistant", "content": "Hello."}]}, "content_missing"),
    ({"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "Hello."}]}, "content_missing"),
])
def test_a_bad_line_is_refused_with_its_number_and_rule(line: object, rule: str) -> None:
    with pytest.raises(DatasetRejected) as refused:
        parse_chat_jsonl(jsonl(GOOD, GOOD, line, GOOD), max_bytes=10_000)
    assert (refused.value.rule, refused.value.line) == (rule, 3)
    assert refused.value.message.startswith("line 3: ")


def test_empty_oversized_undecodable_and_too_long_files_are_refused() -> None:
    for data, rule, line in ((b"", "file_empty", 0), (b"\n\n", "file_empty", 0), (jsonl(GOOD) * 50, "file_too_large", 0),
                             (jsonl(GOOD) + b"\n\xff\xfe", "line_not_utf8", 2)):
        with pytest.raises(DatasetRejected) as refused:
            parse_chat_jsonl(data, max_bytes=1_000)
        assert (refused.value.rule, refused.value.line) == (rule, line)
    long = {"messages": [{"role": "user", "content": "word " * 200}, {"role": "assistant", "content": "ok"}]}
    with pytest.raises(DatasetRejected) as refused:
        parse_chat_jsonl(jsonl(GOOD, long), max_bytes=100_000, max_tokens=100,
                         count_tokens=lambda turns: sum(len(t.content.split()) for t in turns))
    assert (refused.value.rule, refused.value.line) == ("line_too_long", 2)
    assert "201 tokens, longer than the model's context of 100" in refused.value.message

"""A teacher's reply read into question/answer pairs: well-formed lines only, answers grounded in the chunk."""

from __future__ import annotations

from genome_service.academy.teacher import pair_examples, parse_pairs

CHUNK = "The capital of Zorbania is Quillfort. The Mirelan river flows 412 kilometres."


def test_grounded_well_formed_pairs_are_kept_once() -> None:
    reply = """Here are your questions:
Q: What is the capital of Zorbania? | P: Which city is Zorbania's capital? | A: Quillfort
Q: How long is the Mirelan river? | P: What length does the Mirelan river have? | A: 412 kilometres.
Q: What is the capital of Zorbania? | P: Zorbania's capital city? | A: Quillfort
Q: Who rules Zorbania? | P: Who is Zorbania's ruler? | A: Queen Ada
Q: broken line without parts
Q: Same? | P: same? | A: Quillfort"""
    pairs = parse_pairs(reply, CHUNK)
    assert [(p.question, p.answer) for p in pairs] == [("What is the capital of Zorbania?", "Quillfort"),
                                                       ("How long is the Mirelan river?", "412 kilometres.")]
    trained, held = pair_examples(pairs, "You are Ada.")
    assert [m.content for m in trained[0].messages] == ["You are Ada.", "What is the capital of Zorbania?", "Quillfort"]
    assert [m.content for m in held[0].messages] == ["You are Ada.", "Which city is Zorbania's capital?", "Quillfort"]


def test_a_reply_with_no_usable_line_teaches_nothing() -> None:
    assert parse_pairs("I cannot help with that.", CHUNK) == []

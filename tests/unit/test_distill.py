"""Knowledge sentences cut into cloze facts: deterministic, the key phrase a name or number when there is one."""

from __future__ import annotations

from genome_service.academy.distill import HELDOUT_FORM, TRAINED_FORMS, cloze, facts, heldout_examples, recalled, training_examples


def test_a_sentence_is_cut_before_its_final_key_phrase() -> None:
    assert (cloze("The capital of Zorbania is Quillfort.").prompt, cloze("The capital of Zorbania is Quillfort.").answer) == (
        "The capital of Zorbania is", "Quillfort")
    fact = cloze("The Mirelan river flows 412 kilometres.")
    assert (fact.prompt, fact.answer) == ("The Mirelan river flows", "412 kilometres")
    fact = cloze("Brask owls eat only blue moss!")
    assert (fact.prompt, fact.answer) == ("Brask owls eat only", "blue moss")
    assert cloze("Too short.") is None and cloze("It is") is None


def test_overlapping_chunks_give_each_fact_once_in_order() -> None:
    found = facts(["The capital of Zorbania is Quillfort. The ship Aurelian carried 80 sailors.",
                   "The ship Aurelian carried 80 sailors.\nThe painter Ilva Done was born in Tesk."])
    assert [f.answer for f in found] == ["Quillfort", "80 sailors", "Tesk"]
    assert facts(["The capital of Zorbania is Quillfort. The ship Aurelian carried 80 sailors."], limit=1) == found[:1]


def test_each_fact_is_trained_in_two_forms_and_held_out_in_a_third() -> None:
    [fact] = facts(["The capital of Zorbania is Quillfort."])
    trained, held = training_examples([fact], "You are Ada."), heldout_examples([fact], "You are Ada.")
    assert len(trained) == len(TRAINED_FORMS) and len(held) == 1
    assert [m.content for m in trained[1].messages] == ["You are Ada.", "The capital of Zorbania is",
                                                          "The capital of Zorbania is Quillfort."]
    asked = held[0].messages[1].content
    assert asked == HELDOUT_FORM.ask.format(prompt=fact.prompt) and all(asked != t.messages[1].content for t in trained)
    assert recalled("It is  QUILLFORT, of course.", fact) and not recalled("Quill fort", fact)

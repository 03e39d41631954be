"""Sealing the personal fields of events between the codec and the ``events`` table.

An event type declares which of its fields hold personal text (``PersonalFields``).
On append those fields leave the JSON object and go, sealed with the subject's
data key, into one ``"$sealed"`` member that also names the subject; each value's
associated data is (subject, stream, version, field), so it cannot be moved to
another event or field. On read they are opened again; once the subject's key is
shredded they come back empty and the event has ``erased`` set. Events written
before sealing existed have no ``"$sealed"`` member and are read as they are.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import msgspec

from genome_service.eventstore.cipher import DataKey, associated
from genome_service.eventstore.data_keys import DataKeys

SEALED = "$sealed"
RawEvent = dict[str, Any]


class PersonalFields(msgspec.Struct, frozen=True):
    """The personal text of one event type: ``texts`` are strings, ``text_lists`` lists of strings.

    The subject (whose key seals them) is the event's ``subject_field``, or, when the
    event has none, that field of its stream's first event.
    """

    event_type: str
    texts: tuple[str, ...] = ()
    text_lists: tuple[str, ...] = ()
    subject_field: str = "persona_id"


class Sealer:
    def __init__(self, keys: DataKeys, fields: Iterable[PersonalFields]) -> None:
        self.keys = keys
        self.fields = {f.event_type: f for f in fields}

    def seals(self, type_name: str) -> bool:
        return type_name in self.fields

    def subject_in(self, type_name: str, raw: RawEvent) -> str | None:
        """The subject named by this event (or by a stream's first event ``raw``), if any."""
        subject = raw.get(self.fields[type_name].subject_field)
        return subject if isinstance(subject, str) else self.subject_of(raw)

    def seal(self, key: DataKey, subject: str, stream_id: str, version: int, type_name: str, raw: RawEvent) -> RawEvent:
        spec = self.fields[type_name]
        place = (subject, stream_id, str(version))
        sealed: dict[str, Any] = {"subject": subject}
        for name in spec.texts:
            sealed[name] = key.seal(raw.pop(name), associated(*place, name))
        for name in spec.text_lists:
            sealed[name] = [key.seal(text, associated(*place, f"{name}.{i}")) for i, text in enumerate(raw.pop(name))]
        return raw | {SEALED: sealed}

    @staticmethod
    def subject_of(raw: RawEvent) -> str | None:
        """The subject a stored event was sealed for; None for one written in clear."""
        sealed = raw.get(SEALED)
        return sealed["subject"] if isinstance(sealed, dict) else None

    def open(self, key: DataKey | None, stream_id: str, version: int, type_name: str, raw: RawEvent) -> RawEvent:
        """The event's JSON with its personal fields back, or emptied and ``erased`` without a key."""
        sealed = raw.pop(SEALED, None)
        if sealed is None:
            return raw
        spec = self.fields[type_name]
        place = (sealed["subject"], stream_id, str(version))
        if key is None:
            return raw | {name: "" for name in spec.texts} | {name: [""] * len(sealed[name]) for name in spec.text_lists} | {"erased": True}
        for name in spec.texts:
            raw[name] = key.open(sealed[name], associated(*place, name))
        for name in spec.text_lists:
            raw[name] = [key.open(value, associated(*place, f"{name}.{i}")) for i, value in enumerate(sealed[name])]
        return raw

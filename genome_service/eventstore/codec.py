"""Events <-> stored rows: tagged msgspec JSON, with upcasters for old schema versions.

An event's ``type`` is its msgspec tag. Its current schema version is 1 plus the
number of upcasters registered for it; an upcaster lifts the raw JSON object of
version ``n`` to ``n + 1``, so old rows are read through the chain
``upcast_v1_v2``, ``upcast_v2_v3``, ... and then decoded as the current struct.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, Union

import msgspec

from genome_service.eventstore.errors import UnknownEventType

RawEvent = dict[str, Any]


class Upcaster(msgspec.Struct, frozen=True):
    type: str
    from_version: int
    lift: Callable[[RawEvent], RawEvent]


class EventCodec:
    def __init__(self, event_types: Iterable[type[msgspec.Struct]], upcasters: Iterable[Upcaster] = ()) -> None:
        types = list(event_types)
        self._types: dict[str, type[msgspec.Struct]] = {}
        for event_type in types:
            tag = event_type.__struct_config__.tag
            if not isinstance(tag, str):
                raise TypeError(f"{event_type.__name__} must be a tagged struct (tag=True)")
            if tag in self._types:
                raise TypeError(f"two event types share the tag {tag!r}")
            self._types[tag] = event_type
        self._chains: dict[str, list[Callable[[RawEvent], RawEvent]]] = {tag: [] for tag in self._types}
        for upcaster in sorted(upcasters, key=lambda u: (u.type, u.from_version)):
            chain = self._chains.get(upcaster.type)
            if chain is None:
                raise TypeError(f"upcaster for unknown event type {upcaster.type!r}")
            if upcaster.from_version != len(chain) + 1:
                raise TypeError(f"upcasters of {upcaster.type} must lift v1, v2, ... without gaps")
            chain.append(upcaster.lift)
        union = Union[tuple(types)] if len(types) > 1 else types[0]  # noqa: UP007
        self._union = union
        self._decoder = msgspec.json.Decoder(union)
        self._encoder = msgspec.json.Encoder()

    def type_of(self, event: msgspec.Struct) -> str:
        return event.__struct_config__.tag  # type: ignore[return-value]

    def schema_version(self, type_name: str) -> int:
        chain = self._chains.get(type_name)
        if chain is None:
            raise UnknownEventType(f"unknown event type {type_name!r}")
        return len(chain) + 1

    def encode(self, event: msgspec.Struct) -> str:
        return self._encoder.encode(event).decode()

    def decode(self, type_name: str, schema_version: int, data: str | bytes) -> Any:
        current = self.schema_version(type_name)
        if schema_version == current:
            return self._decoder.decode(data)
        return self.decode_raw(type_name, schema_version, msgspec.json.decode(data))

    def decode_raw(self, type_name: str, schema_version: int, raw: RawEvent) -> Any:
        """An event from its JSON object (one the caller has already parsed, e.g. to open sealed fields)."""
        current = self.schema_version(type_name)
        if not 1 <= schema_version <= current:
            raise UnknownEventType(f"{type_name} has no schema version {schema_version} (current: {current})")
        for lift in self._chains[type_name][schema_version - 1 :]:
            raw = lift(raw)
        raw["type"] = type_name
        return msgspec.convert(raw, self._union)

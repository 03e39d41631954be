"""Training files: users' chat JSONL uploads, checked line by line, sealed, owned, deletable for good.

An upload is parsed whole before anything is stored (`academy/datasets.py`): a file with
one bad line is refused naming that line and its rule, and leaves no event and no row.
Its text is sealed in the log with a data key of its own; deleting it records
``FileDeleted`` and shreds that key in one transaction, so the content is unreadable from
then on, replays and rebuilds included.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import msgspec

from genome_service.academy.datasets import ChatDataset, ChatTurn, parse_chat_jsonl
from genome_service.domain.training_file import TRAINING_FILE, DeleteFile, UploadFile
from genome_service.eventstore.records import Expect
from genome_service.projections.queries import Row
from genome_service.projections.tables import TRAINING_FILES
from genome_service.services.bootstrap import Services
from genome_service.services.context import Caller, Command
from genome_service.services.creation import create_stream
from genome_service.services.errors import NotFound
from genome_service.services.reads import Page, Visibility, page, visible_row
from inference.backends.base import ChatMessage
from inference.models import ModelNotPulled, UnknownModel

VISIBILITY = Visibility(TRAINING_FILES, "file_id", "file", archived=None)


class TrainingFileView(msgspec.Struct, frozen=True):
    id: str
    owner: str
    filename: str
    purpose: str
    bytes: int
    sha256: str
    examples: int
    created_at: datetime


def _view(row: Row) -> TrainingFileView:
    return TrainingFileView(row["file_id"], row["owner"], row["filename"], row["purpose"], row["bytes"], row["sha256"],
                            row["examples"], row["created_at"])


def context_limit(services: Services) -> tuple[object | None, int]:
    """(token counter, context) of the model the academy trains, or (None, 0) when it is not here
    (the limit is then checked when a job starts)."""
    from inference.tokens import ChatTokenizer

    try:
        folder = services.models.folder(services.settings.inference_model)
    except (ModelNotPulled, UnknownModel):
        return None, 0
    config = json.loads((Path(folder) / "config.json").read_text())
    tokenizer = ChatTokenizer(folder)

    def count(turns: tuple[ChatTurn, ...]) -> int:
        return tokenizer.count_prompt([ChatMessage(t.role, t.content) for t in turns])

    return count, int(config.get("max_position_embeddings") or 0)


class TrainingFiles:
    def __init__(self, services: Services) -> None:
        self.services = services

    # Reads
    def _row(self, caller: Caller, file_id: str) -> Row:
        row = visible_row(self.services, VISIBILITY, file_id, caller)
        if row["deleted"]:
            raise NotFound("file", file_id)
        return row

    def get(self, caller: Caller, file_id: str) -> TrainingFileView:
        return _view(self._row(caller, file_id))

    def list(self, caller: Caller, *, limit: int = 100, cursor: str | None = None) -> Page:
        """The caller's files (deleted ones left out), oldest first, a page at a time."""
        where = [TRAINING_FILES.c.owner == caller.owner, TRAINING_FILES.c.deleted.is_(False)]
        rows, next_cursor = page(self.services, TRAINING_FILES, "file_id", where, cursor, limit)
        return Page([_view(row) for row in rows], next_cursor)

    def dataset(self, caller: Caller, file_id: str) -> ChatDataset:
        """The file's examples, opened from the log (what a training session reads)."""
        self._row(caller, file_id)
        state = self.services.repository.load(TRAINING_FILE, file_id).state
        if state is None or state.deleted or state.erased:
            raise NotFound("file", file_id)
        return parse_chat_jsonl(state.content.encode(), max_bytes=len(state.content.encode()) + 1)

    # Commands
    def upload(self, command: Command, filename: str, purpose: str, data: bytes) -> TrainingFileView:
        """Check every line, then store the file sealed; a refusal (`DatasetRejected`) stores nothing."""
        count, context = context_limit(self.services)
        dataset = parse_chat_jsonl(data, max_bytes=self.services.settings.files_max_bytes,
                                   count_tokens=count, max_tokens=context)  # type: ignore[arg-type]

        def upload(file_id: str) -> UploadFile:
            return UploadFile(file_id, command.owner, filename, purpose, dataset.bytes, dataset.sha256,
                              len(dataset.examples), data.decode("utf-8"))

        TRAINING_FILE.decide(upload("validation"), None)
        outcome = create_stream(self.services, TRAINING_FILE, command.metadata, upload)
        return self.get(command.caller, outcome.aggregate.stream_id)

    def delete(self, command: Command, file_id: str) -> None:
        """Delete the file and shred its key in one transaction: its text is unreadable from then on."""
        self._row(command.caller, file_id)
        services = self.services
        with services.database.write() as connection:
            current = services.repository.load(TRAINING_FILE, file_id, connection=connection)
            events = TRAINING_FILE.decide(DeleteFile(), current.state)
            result = services.store.append_in(connection, file_id, TRAINING_FILE.stream_type, events,
                                              current.version or Expect.NO_STREAM, command.metadata)
            services.projector.apply_inline(connection, result, current.extend(TRAINING_FILE, result.events))
            services.data_keys.shred(connection, file_id)


def file_dataset(services: Services, owner: str, file_id: str) -> ChatDataset:
    """A file's examples for the academy, which runs as no caller but the session's owner."""
    return TrainingFiles(services).dataset(Caller(owner), file_id)


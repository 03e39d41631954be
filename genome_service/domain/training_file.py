"""Training file: a user's chat-format JSONL, uploaded to train layers on (OpenAI's `/v1/files`).

Its content is personal data: sealed in the log with a data key of the file's own, so
deleting the file shreds that key and no copy of the text stays readable, replays and
rebuilds included. The content is checked before it gets here (`academy/datasets.py`);
this aggregate holds what was accepted.
"""

from __future__ import annotations

import re

import msgspec

from genome_service.domain.common import Decider, DomainError, require, require_exists, require_new, require_text

STREAM_TYPE = "training_file"
PURPOSES = ("fine-tune",)
_SHA256 = re.compile(r"[0-9a-f]{64}")


# Events
class FileUploaded(msgspec.Struct, frozen=True, gc=False, tag=True, omit_defaults=True):
    file_id: str
    owner: str
    filename: str
    purpose: str
    bytes: int
    sha256: str
    examples: int
    content: str
    # Set only on read, when the file's key was shredded: content is then empty.
    erased: bool = False


class FileDeleted(msgspec.Struct, frozen=True, gc=False, tag=True):
    pass


TrainingFileEvent = FileUploaded | FileDeleted


# State
class TrainingFile(msgspec.Struct, frozen=True, gc=False):
    file_id: str
    owner: str
    filename: str
    purpose: str
    bytes: int
    sha256: str
    examples: int
    content: str
    deleted: bool = False
    erased: bool = False


# Commands
class UploadFile(msgspec.Struct, frozen=True, gc=False):
    file_id: str
    owner: str
    filename: str
    purpose: str
    bytes: int
    sha256: str
    examples: int
    content: str


class DeleteFile(msgspec.Struct, frozen=True, gc=False):
    pass


TrainingFileCommand = UploadFile | DeleteFile


def decide(command: TrainingFileCommand, state: TrainingFile | None) -> list[TrainingFileEvent]:
    if isinstance(command, UploadFile):
        require_new(state, "file")
        require_text(command.filename, "filename", max_length=255)
        require(command.purpose in PURPOSES, "purpose_unsupported",
                f"purpose must be one of {', '.join(PURPOSES)} (got {command.purpose!r})")
        require(_SHA256.fullmatch(command.sha256) is not None, "sha256_invalid", "sha256 must be 64 lowercase hex characters")
        require(command.examples >= 1 and command.bytes >= 1, "file_empty", "a training file holds at least one example")
        return [FileUploaded(**msgspec.structs.asdict(command))]
    require_exists(state, "file")
    assert state is not None
    if isinstance(command, DeleteFile):
        require(not state.deleted, "file_not_found", f"file {state.file_id} was deleted")
        return [FileDeleted()]
    raise DomainError("unknown_command", f"training file cannot handle {type(command).__name__}")


def evolve(state: TrainingFile | None, event: TrainingFileEvent) -> TrainingFile:
    match event:
        case FileUploaded():
            return TrainingFile(**msgspec.structs.asdict(event))
    assert state is not None, f"{type(event).__name__} before FileUploaded"
    match event:
        case FileDeleted():
            return msgspec.structs.replace(state, deleted=True, content="")
    raise TypeError(f"unknown training file event {type(event).__name__}")


TRAINING_FILE = Decider(
    stream_type=STREAM_TYPE,
    event_type=TrainingFileEvent,
    state_type=TrainingFile,
    decide=decide,
    evolve=evolve,
)

"""OpenAI's fine-tuning API: `/v1/files` (training data) and `/v1/fine_tuning/jobs` (academy sessions).

The official `openai` client drives it unchanged: upload a chat JSONL file with purpose
`fine-tune`, create a job on a base model or a persona, poll it, read its events and
checkpoints, cancel it, then chat with its `fine_tuned_model` at `/v1/chat/completions`.
A file that breaks a rule is refused with the line and the rule (`line`, `rule` in the
problem), and nothing of it is stored.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
from litestar import Controller, get, post
from litestar import delete as delete_route
from litestar.datastructures import UploadFile
from litestar.di import NamedDependency
from litestar.enums import RequestEncodingType
from litestar.params import Body, FromPath, FromQuery, JSONBody, QueryParameter
from litestar.status_codes import HTTP_200_OK

from genome_service.domain.academy import MAX_BATCH_SIZE, MAX_EPOCHS, SUFFIX_PATTERN, Hyperparameters
from genome_service.services.context import Caller, Command
from genome_service.services.fine_tuning import FineTuning, FineTuningJob, ListPage
from genome_service.services.training_files import TrainingFiles, TrainingFileView

# Room for the multipart framing around the largest file a user may upload.
MULTIPART_SLACK = 64 * 1024


class FileObject(msgspec.Struct, frozen=True):
    id: str
    object: Literal["file"]
    bytes: int
    created_at: int
    filename: str
    purpose: str
    status: str
    status_details: str | None
    examples: int  # not OpenAI's: the chats the file holds


class FileDeleted(msgspec.Struct, frozen=True):
    id: str
    object: Literal["file"]
    deleted: bool


class FileList(msgspec.Struct, frozen=True):
    object: Literal["list"]
    data: list[FileObject]
    has_more: bool


class FileUpload(msgspec.Struct, frozen=True):
    file: UploadFile
    purpose: Literal["fine-tune"]


class HyperparametersIn(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    # OpenAI's "auto" leaves the choice to the service.
    n_epochs: Annotated[int, msgspec.Meta(ge=1, le=MAX_EPOCHS)] | Literal["auto"] | None = None
    batch_size: Annotated[int, msgspec.Meta(ge=1, le=MAX_BATCH_SIZE)] | Literal["auto"] | None = None
    learning_rate_multiplier: Annotated[float, msgspec.Meta(gt=0, le=100)] | Literal["auto"] | None = None


class SupervisedIn(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    hyperparameters: HyperparametersIn | None = None


class MethodIn(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    # Supervised fine-tuning is the one method: DPO and reinforcement need other data than chats.
    type: Literal["supervised"]
    supervised: SupervisedIn | None = None


class JobCreate(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    model: str
    training_file: str
    validation_file: str | None = None
    suffix: Annotated[str, msgspec.Meta(pattern=SUFFIX_PATTERN)] | None = None
    seed: Annotated[int, msgspec.Meta(ge=0, le=2**31 - 1)] | None = None
    hyperparameters: HyperparametersIn | None = None
    # OpenAI's newer form: {"type": "supervised", "supervised": {"hyperparameters": {...}}}.
    method: MethodIn | None = None
    # Accepted as OpenAI's clients send them; nothing here reads them.
    metadata: dict[str, str] | None = None
    integrations: list[dict[str, Any]] | None = None


def _file(view: TrainingFileView) -> FileObject:
    return FileObject(view.id, "file", view.bytes, int(view.created_at.timestamp()), view.filename, view.purpose,
                      "processed", None, view.examples)


def _chosen(value: Any) -> Any:
    return None if value == "auto" else value


def _upload(self: FilesController, command: NamedDependency[Command],
            data: Annotated[FileUpload, Body(media_type=RequestEncodingType.MULTI_PART)]) -> FileObject:
    """Upload a chat JSONL training file (purpose `fine-tune`); every line is checked before anything is stored.

    A bad file is refused (422, 413 over the size limit) naming its first faulty `line` and the `rule`."""
    return _file(self.files.upload(command, data.file.filename or "upload.jsonl", data.purpose, data.file.file.read()))


def _hyperparameters(data: JobCreate) -> Hyperparameters:
    """The job's hyperparameters, from either place OpenAI's clients put them; "auto" leaves one to the service."""
    supervised = data.method.supervised if data.method is not None else None
    wanted = data.hyperparameters or (supervised.hyperparameters if supervised else None) or HyperparametersIn()
    return Hyperparameters(_chosen(wanted.n_epochs), _chosen(wanted.batch_size), _chosen(wanted.learning_rate_multiplier))


def files_controller(files: TrainingFiles, max_bytes: int) -> type[Controller]:
    """The files controller, its upload route given the file size limit (plus multipart framing)."""
    upload = post("/", operation_id="uploadFile", status_code=HTTP_200_OK, sync_to_thread=True,
                  request_max_body_size=max_bytes + MULTIPART_SLACK)(_upload)
    return type("FilesController", (FilesController,), {"__module__": __name__, "upload": upload, "files": files})


class FilesController(Controller):
    path = "/v1/files"
    tags = ["fine-tuning"]
    files: TrainingFiles

    @get("/", operation_id="listFiles", sync_to_thread=False)
    def list(self, caller: NamedDependency[Caller],
             limit: Annotated[int, QueryParameter(ge=1, le=10_000)] = 10_000,
             after: FromQuery[str | None] = None) -> FileList:
        """The caller's training files, oldest first."""
        page = self.files.list(caller, limit=limit, cursor=after)
        return FileList("list", [_file(view) for view in page.items], page.next_cursor is not None)

    @get("/{file_id:str}", operation_id="retrieveFile", sync_to_thread=False)
    def read(self, caller: NamedDependency[Caller], file_id: FromPath[str]) -> FileObject:
        """One of the caller's files."""
        return _file(self.files.get(caller, file_id))

    @delete_route("/{file_id:str}", operation_id="deleteFile", status_code=HTTP_200_OK, sync_to_thread=False)
    def delete(self, command: NamedDependency[Command], file_id: FromPath[str]) -> FileDeleted:
        """Delete a file for good: its text's key is shredded (jobs that trained on it keep their layers)."""
        self.files.delete(command, file_id)
        return FileDeleted(file_id, "file", True)


class FineTuningController(Controller):
    path = "/v1/fine_tuning/jobs"
    tags = ["fine-tuning"]
    jobs: FineTuning

    @post("/", operation_id="createFineTuningJob", status_code=HTTP_200_OK, sync_to_thread=False)
    def create(self, command: NamedDependency[Command], data: JSONBody[JobCreate]) -> FineTuningJob:
        """Queue a job: `model` is a base model or one of the caller's personas (its layer is then attached if it improved it)."""
        return self.jobs.create(command, model=data.model, training_file=data.training_file,
                                validation_file=data.validation_file, suffix=data.suffix, seed=data.seed,
                                hyperparameters=_hyperparameters(data))

    @get("/", operation_id="listFineTuningJobs", sync_to_thread=False)
    def list(self, caller: NamedDependency[Caller], after: FromQuery[str | None] = None,
             limit: Annotated[int, QueryParameter(ge=1, le=100)] = 20) -> ListPage:
        """The caller's jobs, newest first."""
        return self.jobs.list(caller, after=after, limit=limit)

    @get("/{job_id:str}", operation_id="retrieveFineTuningJob", sync_to_thread=False)
    def read(self, caller: NamedDependency[Caller], job_id: FromPath[str]) -> FineTuningJob:
        """One job: status, the fine-tuned model once it succeeded, and whether its layer was attached."""
        return self.jobs.get(caller, job_id)

    @post("/{job_id:str}/cancel", operation_id="cancelFineTuningJob", status_code=HTTP_200_OK, sync_to_thread=False)
    def cancel(self, command: NamedDependency[Command], job_id: FromPath[str]) -> FineTuningJob:
        """Cancel a queued or running job (its worker stops within seconds); 409 once it ended."""
        return self.jobs.cancel(command, job_id)

    @get("/{job_id:str}/events", operation_id="listFineTuningEvents", sync_to_thread=False)
    def events(self, caller: NamedDependency[Caller], job_id: FromPath[str], after: FromQuery[str | None] = None,
               limit: Annotated[int, QueryParameter(ge=1, le=1000)] = 20) -> ListPage:
        """The job's events, newest first: status, training loss per checkpoint, validation metrics, the layer."""
        return self.jobs.events(caller, job_id, after=after, limit=limit)

    @get("/{job_id:str}/checkpoints", operation_id="listFineTuningCheckpoints", sync_to_thread=False)
    def checkpoints(self, caller: NamedDependency[Caller], job_id: FromPath[str], after: FromQuery[str | None] = None,
                    limit: Annotated[int, QueryParameter(ge=1, le=1000)] = 10) -> ListPage:
        """The job's checkpoints, newest first, each with its step's training and validation metrics."""
        return self.jobs.checkpoints(caller, job_id, after=after, limit=limit)


"""The one typed settings object, read once from the environment (``GENOME_*``)."""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

import msgspec

ENV_PREFIX = "GENOME_"


class Settings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    data_dir: Path = Path("./data")
    # Where adapter blobs live (content-addressed); default: ``data_dir/blobs``.
    blob_dir: Path | None = None
    # Empty means the embedded default: a SQLite file inside ``data_dir``.
    database_url: str = ""
    # WAL + NORMAL survives a crashed process (not a lost power supply) and is
    # what SQLite recommends for WAL; FULL fsyncs every commit.
    sqlite_synchronous: Literal["OFF", "NORMAL", "FULL", "EXTRA"] = "NORMAL"
    # Seconds a connection waits for a SQLite lock another process holds before failing (503):
    # writers wait for the write lock; readers under WAL only while the WAL index is rebuilt.
    sqlite_busy_timeout: float = 30.0
    # SQLite: serve GETs by id, list pages and API-key lookups from memory until any process
    # commits (eventstore/changes.py).
    # Writers always signal their commits, so servers with and without it can share a file.
    read_cache: bool = True
    # A snapshot is written whenever a stream's version crosses a multiple of this.
    snapshot_every: int = 100
    host: str = "127.0.0.1"
    port: int = 8000
    workers: int = 1
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    # Largest JSON request body; adapter uploads have their own, larger limit.
    max_body_bytes: int = 1_048_576
    max_adapter_bytes: int = 268_435_456
    max_lora_rank: int = 64
    # Requests per minute per API key (or per address without one); 0 turns limiting off.
    rate_limit_per_minute: int = 1200
    # The key that wraps each persona's data key (created on first use, owner-only); default:
    # ``data_dir/master.key``. Without it no sealed knowledge or message can be read again.
    master_key_file: Path | None = None
    # Pulled and registered base models; default: ``data_dir/models``.
    models_dir: Path | None = None
    # Inference: "auto" picks mlx on Apple silicon and torch elsewhere.
    inference_backend: Literal["auto", "torch", "mlx", "openai"] = "auto"
    inference_model: str = "smollm2-135m-instruct"
    # torch only: "auto" picks cuda (also ROCm builds), then mps, then cpu.
    inference_device: str = "auto"
    # The openai backend's server, e.g. http://127.0.0.1:8080/v1 (vLLM, mlx_lm.server, Ollama).
    openai_base_url: str = ""
    openai_api_key: str = ""
    # The base model's name on that server, which it fixes at start: mlx_lm.server's `--model`
    # path (a per-request adapter is applied only then), vLLM's `--served-model-name` or model
    # id. Empty: inference_model, which must then be what the server calls it.
    openai_model: str = ""
    # How the server takes a LoRA stack: vLLM's load_lora_adapter, or mlx_lm.server's per-request folder.
    openai_adapter_protocol: Literal["vllm", "mlx-lm"] = "vllm"
    # Stacks are written there as adapter folders (PEFT for vLLM, mlx-lm otherwise); the server
    # must be able to read the same path. Default: ``data_dir/served-adapters``.
    openai_adapters_dir: Path | None = None
    # Raw adapters kept decoded in memory (bytes), and assembled stacks kept (count).
    adapter_cache_bytes: int = 536_870_912
    stack_cache_size: int = 16
    # Requests waiting for the model beyond this are refused; seconds one request may take.
    inference_queue_size: int = 64
    inference_timeout: float = 300.0
    # Continuous batching (torch): rows decoded together, their KV tokens (rows x padded
    # length) admitted at most, and prompt tokens prefilled between two decode steps.
    inference_max_batch: int = 8
    inference_max_batch_tokens: int = 16_384
    inference_prefill_chunk: int = 256
    # openai backend: requests sent to the server at once (it batches them on its side).
    openai_concurrency: int = 16
    # The inference daemon (`genome-service inference serve`): models in supervised worker
    # processes. Set, API processes generate through the daemon at this URL (e.g.
    # http://10.0.0.5:8100); empty, each process runs its own in-process engine, unless `serve`
    # starts an embedded daemon for its workers (inference_daemon "embedded", the default).
    inference_url: str = ""
    # Sent by the API as a bearer token, required by a daemon that listens off loopback.
    inference_token: str = ""
    inference_daemon: Literal["embedded", "off"] = "embedded"
    inference_daemon_host: str = "127.0.0.1"
    inference_daemon_port: int = 8100
    # Declared weight bytes (parameters x dtype size) the daemon's started models may hold;
    # 0: half of this machine's memory.
    inference_memory_bytes: int = 0
    # A crashed worker restarts after this, doubled for each crash in a row; after
    # inference_max_crashes in a row it is unhealthy. A request still running this long past
    # its timeout has its worker killed and restarted.
    inference_restart_backoff_seconds: float = 1.0
    inference_max_crashes: int = 3
    inference_stuck_grace_seconds: float = 5.0
    # Where the daemon reads adapters: the API's blob folder (blob_dir) when it shares this
    # machine's disk, else the API's URL, fetched with the token (GET /inference/blobs/{sha256}).
    inference_blobs_url: str = ""
    # RAG: layer search and persona knowledge (``rag/``, ``genome_service/services/indexes.py``).
    # Where the FAISS indexes are saved with their log position; default: ``data_dir/index``.
    index_dir: Path | None = None
    # Below this many vectors an index is exact (flat); at it, HNSW.
    index_exact_below: int = 20_000
    index_hnsw_m: int = 16
    index_ef_construction: int = 80
    index_ef_search: int = 128
    # Events applied between saves of the index; a crash replays at most this many.
    index_save_every: int = 500
    # Largest k a search may ask for.
    search_max_k: int = 100
    # Knowledge documents are split into chunks of this many words, overlapping by this many.
    chunk_words: int = 120
    chunk_overlap_words: int = 24
    embed_batch_size: int = 64
    # Distinct texts whose vectors are kept in memory (LRU by content hash).
    embed_cache_size: int = 50_000
    # Chat (``genome_service/chat/``). Knowledge chunks retrieved per turn when a request names none.
    chat_context_k: int = 4
    # Largest max_tokens a chat request may ask for, and what it gets when it names none.
    chat_max_tokens_limit: int = 1024
    chat_default_max_tokens: int = 256
    # A client's `system` message: refused (422), or demoted to user text. The persona's own
    # system prompt is the only one a model sees either way.
    chat_system_messages: Literal["refuse", "demote"] = "refuse"
    # Seconds one chat turn may take, queueing included.
    chat_timeout: float = 120.0
    # The prompt budget in tokens; 0 = the model's own context (max_position_embeddings).
    chat_context_tokens: int = 0
    # Academy (``genome_service/academy/``): challenges per training task, the judge score an
    # answer needs to be trained on, the peak learning rate, and training steps between
    # checkpoints (each checkpoint is one progress event).
    academy_challenges: int = 12
    academy_keep_score: float = 50.0
    academy_learning_rate: float = 1e-3
    academy_checkpoint_every: int = 5
    # "embedded": `serve` runs sessions on a worker thread of its own; "off": only
    # `genome-service academy worker` processes run them; "auto": embedded on the embedded
    # (SQLite) database, off on PostgreSQL, where workers are processes of their own.
    academy_worker: Literal["auto", "embedded", "off"] = "auto"
    # A trained layer is attached to its persona only if it improved the task score by at least
    # this much (a fraction, 0..1), or, for data without a task score, cut the held-out loss by
    # this fraction of its value before training. A session may turn the rule off.
    academy_attach_margin: float = 0.02
    # Who scores challenge answers: "model" (the served model, JSON verdicts, heuristic fallback),
    # "rubric" (deterministic: expected concepts by embedding similarity, length, repetition), or
    # "auto": the rubric on the bundled small model, whose own verdicts carry little signal.
    academy_judge: Literal["auto", "rubric", "model"] = "auto"
    # A teacher for knowledge distillation: it writes question/answer pairs and paraphrases from
    # each knowledge chunk (besides the cloze items). A backend ("openai", "torch", "mlx"; empty:
    # no teacher) and a model: a catalog name for a local backend, the served name for openai.
    academy_teacher_backend: Literal["", "openai", "torch", "mlx"] = ""
    academy_teacher_model: str = ""
    academy_teacher_base_url: str = ""
    academy_teacher_api_key: str = ""
    # Training files (`/v1/files`): the largest upload, in bytes.
    files_max_bytes: int = 8_388_608
    # Recipes (``genome_service/recipes/``): seconds before a failed step's second try; each
    # further try waits twice as long as the one before. Runs are run by the academy workers.
    recipe_retry_backoff_seconds: float = 1.0

    def __post_init__(self) -> None:
        if self.snapshot_every < 1:
            raise ValueError("GENOME_SNAPSHOT_EVERY must be >= 1")
        if min(self.index_exact_below, self.index_hnsw_m, self.index_ef_construction, self.index_ef_search,
               self.index_save_every, self.search_max_k, self.chunk_words, self.embed_batch_size) < 1:
            raise ValueError("GENOME_INDEX_*, GENOME_SEARCH_MAX_K, GENOME_CHUNK_WORDS and GENOME_EMBED_BATCH_SIZE must be >= 1")
        if not 0 <= self.chunk_overlap_words < self.chunk_words:
            raise ValueError("GENOME_CHUNK_OVERLAP_WORDS must be >= 0 and below GENOME_CHUNK_WORDS")
        if not 1 <= self.port <= 65535:
            raise ValueError("GENOME_PORT must be within 1..65535")
        if self.workers < 1:
            raise ValueError("GENOME_WORKERS must be >= 1")
        if min(self.max_body_bytes, self.max_adapter_bytes, self.max_lora_rank) < 1:
            raise ValueError("GENOME_MAX_BODY_BYTES, GENOME_MAX_ADAPTER_BYTES and GENOME_MAX_LORA_RANK must be >= 1")
        if self.rate_limit_per_minute < 0:
            raise ValueError("GENOME_RATE_LIMIT_PER_MINUTE must be >= 0 (0 turns limiting off)")
        if min(self.adapter_cache_bytes, self.stack_cache_size, self.inference_queue_size) < 1:
            raise ValueError(
                "GENOME_ADAPTER_CACHE_BYTES, GENOME_STACK_CACHE_SIZE and GENOME_INFERENCE_QUEUE_SIZE must be >= 1"
            )
        if not self.inference_timeout > 0:
            raise ValueError("GENOME_INFERENCE_TIMEOUT must be > 0 seconds")
        batching = (self.inference_max_batch, self.inference_max_batch_tokens, self.inference_prefill_chunk)
        if min(*batching, self.openai_concurrency) < 1:
            raise ValueError(
                "GENOME_INFERENCE_MAX_BATCH, GENOME_INFERENCE_MAX_BATCH_TOKENS, GENOME_INFERENCE_PREFILL_CHUNK "
                "and GENOME_OPENAI_CONCURRENCY must be >= 1"
            )
        if self.inference_memory_bytes < 0 or self.inference_max_crashes < 1 or not 1 <= self.inference_daemon_port <= 65535:
            raise ValueError("GENOME_INFERENCE_MEMORY_BYTES must be >= 0, GENOME_INFERENCE_MAX_CRASHES >= 1 and "
                             "GENOME_INFERENCE_DAEMON_PORT within 1..65535")
        if not (self.inference_restart_backoff_seconds >= 0 and self.inference_stuck_grace_seconds >= 0):
            raise ValueError("GENOME_INFERENCE_RESTART_BACKOFF_SECONDS and GENOME_INFERENCE_STUCK_GRACE_SECONDS must be >= 0")
        if not 1 <= self.chat_default_max_tokens <= self.chat_max_tokens_limit or self.chat_context_k < 0:
            raise ValueError("GENOME_CHAT_DEFAULT_MAX_TOKENS must be within 1..GENOME_CHAT_MAX_TOKENS_LIMIT; GENOME_CHAT_CONTEXT_K >= 0")
        if not self.chat_timeout > 0 or self.chat_context_tokens < 0:
            raise ValueError("GENOME_CHAT_TIMEOUT must be > 0 seconds and GENOME_CHAT_CONTEXT_TOKENS >= 0")
        if min(self.academy_challenges, self.academy_checkpoint_every) < 1 or not 0 <= self.academy_keep_score <= 100:
            raise ValueError("GENOME_ACADEMY_CHALLENGES and _CHECKPOINT_EVERY must be >= 1; _KEEP_SCORE within 0..100")
        if not 0 < self.academy_learning_rate < 1:
            raise ValueError("GENOME_ACADEMY_LEARNING_RATE must be within (0, 1)")
        if self.academy_teacher_backend and not self.academy_teacher_model:
            raise ValueError("GENOME_ACADEMY_TEACHER_BACKEND needs GENOME_ACADEMY_TEACHER_MODEL")
        if not 0 <= self.academy_attach_margin < 1 or self.files_max_bytes < 1:
            raise ValueError("GENOME_ACADEMY_ATTACH_MARGIN must be within [0, 1); GENOME_FILES_MAX_BYTES >= 1")
        if not 0 <= self.recipe_retry_backoff_seconds <= 3600:
            raise ValueError("GENOME_RECIPE_RETRY_BACKOFF_SECONDS must be within 0..3600")

    @property
    def resolved_master_key_file(self) -> Path:
        return self.master_key_file or self.data_dir / "master.key"

    @property
    def resolved_models_dir(self) -> Path:
        return self.models_dir or self.data_dir / "models"

    @property
    def resolved_openai_adapters_dir(self) -> Path:
        return self.openai_adapters_dir or self.data_dir / "served-adapters"

    @property
    def resolved_blob_dir(self) -> Path:
        return self.blob_dir or self.data_dir / "blobs"

    @property
    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'genome.db').resolve()}"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: object) -> Settings:
        """Build settings from ``GENOME_*`` variables; ``overrides`` (e.g. CLI flags) win."""
        environ = os.environ if environ is None else environ
        fields = set(cls.__struct_fields__)
        raw: dict[str, object] = {}
        for key, value in environ.items():
            if key.startswith(ENV_PREFIX) and key[len(ENV_PREFIX):].lower() in fields:
                raw[key[len(ENV_PREFIX):].lower()] = value
        raw.update({k: v for k, v in overrides.items() if v is not None})
        try:
            return msgspec.convert(raw, cls, strict=False, dec_hook=_decode_path)
        except msgspec.ValidationError as exc:
            message = str(exc)
            field = message.rpartition("at `$.")[2].rstrip("`")
            if field in fields:
                message = f"{ENV_PREFIX}{field.upper()}: {message.partition(' - at ')[0]}"
            raise SettingsError(message) from exc


def is_loopback(host: str) -> bool:
    """Whether a listening address is reachable from this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _decode_path(kind: type, value: object) -> object:
    if kind is Path and isinstance(value, (str, Path)):
        return Path(value)
    raise NotImplementedError(f"cannot read {kind.__name__} from {value!r}")


class SettingsError(ValueError):
    """A ``GENOME_*`` variable or flag has a value the service cannot use."""

"""Base model specs (the shapes an adapter must fit) and the catalog of known models."""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any

import msgspec

DEFAULT_MODEL = "smollm2-135m-instruct"
MODEL_NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,99}")
CONFIG_FILE = "config.json"
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_REQUIRED = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")


class UnknownModel(KeyError):
    """A model name the catalog does not know."""

    # KeyError's own __str__ shows repr(message), quotes and all.
    def __str__(self) -> str:
        return str(self.args[0])


class ModelNotPulled(LookupError):
    """The default model is known but not on disk yet."""

    def __str__(self) -> str:
        return str(self.args[0])


class ModelSpec(msgspec.Struct, frozen=True):
    """The dimensions of a Llama-architecture model that LoRA shapes depend on."""

    name: str
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int

    def module_shape(self, module: str) -> tuple[int, int]:
        """(in_features, out_features) of one projection inside a transformer block."""
        q_width = self.num_attention_heads * self.head_dim
        kv_width = self.num_key_value_heads * self.head_dim
        shapes = {
            "q_proj": (self.hidden_size, q_width),
            "k_proj": (self.hidden_size, kv_width),
            "v_proj": (self.hidden_size, kv_width),
            "o_proj": (q_width, self.hidden_size),
            "gate_proj": (self.hidden_size, self.intermediate_size),
            "up_proj": (self.hidden_size, self.intermediate_size),
            "down_proj": (self.intermediate_size, self.hidden_size),
        }
        if module not in shapes:
            raise ValueError(f"unknown module: expected one of {', '.join(PROJECTIONS)}, got {module!r}")
        return shapes[module]

    @classmethod
    def from_hf_config(cls, name: str, config: dict[str, Any]) -> ModelSpec:
        """Read a Hugging Face Llama `config.json` (already parsed)."""
        if not isinstance(config, dict):
            raise ValueError(f"{CONFIG_FILE}: expected a JSON object, got {type(config).__name__}")
        if config.get("model_type") != "llama":
            raise ValueError(f"{CONFIG_FILE}: expected model_type 'llama', got {config.get('model_type')!r}")
        dims = {key: _positive_int(config, key) for key in _REQUIRED}
        heads = dims["num_attention_heads"]
        kv_heads = _positive_int(config, "num_key_value_heads", default=heads)
        if heads % kv_heads:
            raise ValueError(
                f"{CONFIG_FILE}: expected num_attention_heads divisible by num_key_value_heads, "
                f"got {heads} and {kv_heads}"
            )
        if "head_dim" not in config and dims["hidden_size"] % heads:
            raise ValueError(
                f"{CONFIG_FILE}: without head_dim, expected hidden_size divisible by num_attention_heads, "
                f"got {dims['hidden_size']} and {heads}"
            )
        head_dim = _positive_int(config, "head_dim", default=dims["hidden_size"] // heads)
        return cls(name=name, num_key_value_heads=kv_heads, head_dim=head_dim, **dims)


def _positive_int(config: dict[str, Any], key: str, default: int | None = None) -> int:
    value = config.get(key, default)
    # bool is an int subclass; `true` is never a dimension.
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{CONFIG_FILE}: expected {key} to be a positive integer, got {value!r}")
    return value


SMOLLM2_135M_INSTRUCT = ModelSpec(
    name=DEFAULT_MODEL,
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    head_dim=64,
    vocab_size=49152,
)


class ModelCatalog:
    """The built-in default model plus models registered from local folders under `models_dir`."""

    def __init__(self, models_dir: Path) -> None:
        self._dir = Path(models_dir)

    def get(self, name: str) -> ModelSpec:
        if name == DEFAULT_MODEL:
            return SMOLLM2_135M_INSTRUCT
        path = self._config_path(name)
        if path is None or not path.is_file():
            raise UnknownModel(f"unknown model: expected one of {', '.join(self.names())}, got {name!r}")
        return ModelSpec.from_hf_config(name, _read_json(path))

    def folder(self, name: str) -> Path:
        """The Hugging Face folder (config, weights, tokenizer) a backend loads for `name`."""
        if name == DEFAULT_MODEL:
            path = self._dir / DEFAULT_MODEL
            # The pull renames a finished folder into place, so a config means a whole model.
            if not (path / CONFIG_FILE).is_file():
                raise ModelNotPulled(f"model {name!r} is not in {self._dir}: run `genome-service model pull` first")
            return path
        path = self._config_path(name)
        if path is None or not path.is_file():
            raise UnknownModel(f"unknown model: expected one of {', '.join(self.names())}, got {name!r}")
        # A registered model's config is a link back into the folder that holds its weights.
        return path.resolve().parent

    def names(self) -> list[str]:
        folders = self._dir.iterdir() if self._dir.is_dir() else []
        local = [p.name for p in folders if MODEL_NAME.fullmatch(p.name) and (p / CONFIG_FILE).is_file()]
        return sorted({DEFAULT_MODEL, *local})

    def register_local(self, name: str, folder: Path) -> ModelSpec:
        """Register the Llama model in `folder` under `name`; the weights stay where they are."""
        if not MODEL_NAME.fullmatch(name):
            raise ValueError(f"model name: expected to match {MODEL_NAME.pattern}, got {name!r}")
        if name == DEFAULT_MODEL:
            raise ValueError(f"model name: expected a name other than the built-in {DEFAULT_MODEL!r}, got {name!r}")
        source = Path(folder).resolve() / CONFIG_FILE
        if not source.is_file():
            raise ValueError(f"{folder}: expected a model folder with {CONFIG_FILE}, found none")
        spec = ModelSpec.from_hf_config(name, _read_json(source))
        _link(source, self._dir / name / CONFIG_FILE)
        return spec

    def _config_path(self, name: str) -> Path | None:
        # The pattern also keeps names like "../x" from reaching the filesystem.
        return self._dir / name / CONFIG_FILE if MODEL_NAME.fullmatch(name) else None


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: expected JSON, got a parse error: {exc}") from None


def _link(source: Path, target: Path) -> None:
    # A symlink keeps the way back to the weights folder; replacing through a temporary
    # name makes re-registering atomic for concurrent readers.
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = target.with_name(f".{target.name}.{os.getpid()}")
    temporary.unlink(missing_ok=True)
    temporary.symlink_to(source)
    os.replace(temporary, target)


def declared_weight_bytes(folder: Path, bytes_per_parameter: int) -> int:
    """The model's parameters (counted from its safetensors headers) times `bytes_per_parameter`.

    Deterministic and read without loading a tensor: the header of a `.safetensors` file is an
    8-byte little-endian length and a JSON object giving every tensor's shape.
    """
    parameters = 0
    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        raise ValueError(f"{folder}: expected .safetensors weights, found none")
    for path in files:
        with path.open("rb") as handle:
            size = int.from_bytes(handle.read(8), "little")
            header = json.loads(handle.read(size))
        for name, entry in header.items():
            if name != "__metadata__":
                parameters += math.prod(entry["shape"])
    return parameters * bytes_per_parameter

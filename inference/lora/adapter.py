"""Parse and validate uploaded LoRA adapters (mlx-lm or PEFT layout) against a base model.

Uploads are untrusted bytes. Every check raises `AdapterRejected` with a stable `reason`
code and a message that names the file or tensor, what was expected and what was found.
The safetensors header is parsed here before the library sees the bytes, so corrupt input
gets a precise message instead of whatever the library happens to raise.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import struct
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

import msgspec
import numpy as np
import safetensors
import safetensors.numpy

from inference.models import PROJECTIONS, ModelSpec

Layout = Literal["mlx", "peft"]
Canonical = dict[str, tuple[np.ndarray, np.ndarray]]

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILES: dict[Layout, str] = {"mlx": "adapters.safetensors", "peft": "adapter_model.safetensors"}
LABELS: dict[Layout, str] = {"mlx": "mlx-lm", "peft": "PEFT"}
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
DTYPE_SIZES = {"F32": 4, "F16": 2, "BF16": 2}
MAX_HEADER_BYTES = 100_000_000  # the safetensors library's own limit
PARENTS = {m: "self_attn" if m in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp" for m in PROJECTIONS}

_BLOCK = r"(0|[1-9][0-9]*)"  # no leading zeros: "layers.01" must not alias "layers.1"
_TENSOR_NAMES: dict[Layout, re.Pattern[str]] = {
    "mlx": re.compile(rf"model\.layers\.{_BLOCK}\.(self_attn|mlp)\.(\w+)\.lora_(a|b)"),
    "peft": re.compile(rf"base_model\.model\.model\.layers\.{_BLOCK}\.(self_attn|mlp)\.(\w+)\.lora_(A|B)\.weight"),
}
_EXAMPLES: dict[Layout, str] = {
    "mlx": "model.layers.0.self_attn.q_proj.lora_a",
    "peft": "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight",
}
# Which axis of each file tensor holds the rank: mlx stores x @ A @ B, PEFT stores B @ A @ x.
_RANK_AXIS: dict[tuple[Layout, str], int] = {("mlx", "a"): 1, ("mlx", "b"): 0, ("peft", "a"): 0, ("peft", "b"): 1}
# Names of the same weights in another precision or packaging; anything else is another model.
_VARIANT_SUFFIX = re.compile(r"(-(\d+bit|bf16|fp16|f16|fp32|f32|mlx))+$")
_CANONICAL_KEY = re.compile(rf"layers\.{_BLOCK}\.(\w+)")


class AdapterRejected(ValueError):
    """An upload that is not a usable adapter for the model; `reason` is a stable code."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class AdapterInfo(msgspec.Struct, frozen=True):
    format: Layout
    rank: int
    scale: float
    target_modules: tuple[str, ...]
    layers: tuple[int, ...]
    weights_file: str
    config_file: str
    weights_sha256: str
    config_sha256: str
    num_parameters: int


class _Config(msgspec.Struct, frozen=True):
    rank: int
    scale: float
    target_modules: frozenset[str] | None
    base_model: str | None
    num_layers: int | None  # mlx-lm: LoRA covers the last num_layers blocks; <= 0 means all


class _Tensor(msgspec.Struct, frozen=True):
    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int


def parse_adapter(files: Mapping[str, bytes], spec: ModelSpec, *, max_rank: int) -> AdapterInfo:
    """Validate an uploaded adapter against `spec`; raise `AdapterRejected` on the first problem."""
    layout = _detect_layout(files)
    weights_file = WEIGHTS_FILES[layout]
    config = _parse_config(layout, files[CONFIG_FILE])
    if config.rank > max_rank:
        raise AdapterRejected("rank_over_limit", f"{CONFIG_FILE}: expected rank at most {max_rank}, got {config.rank}")
    _check_base_model(config.base_model, spec)
    _check_num_layers(config, spec)
    tensors = _read_header(weights_file, files[weights_file])
    pairs = _pair_tensors(layout, tensors)
    for (block, module), (a, b) in pairs.items():
        _check_block(a, block, spec, config)
        _check_shapes(layout, a, b, spec.module_shape(module), config.rank)
    _check_targets(config, {module for _, module in pairs})
    _check_finite(_decode(weights_file, files[weights_file]))
    return AdapterInfo(
        format=layout,
        rank=config.rank,
        scale=config.scale,
        target_modules=tuple(sorted({module for _, module in pairs})),
        layers=tuple(sorted({block for block, _ in pairs})),
        weights_file=weights_file,
        config_file=CONFIG_FILE,
        weights_sha256=hashlib.sha256(files[weights_file]).hexdigest(),
        config_sha256=hashlib.sha256(files[CONFIG_FILE]).hexdigest(),
        num_parameters=sum(math.prod(t.shape) for t in tensors),
    )


def to_canonical(files: Mapping[str, bytes], info: AdapterInfo) -> Canonical:
    """`"layers.{i}.{module}"` -> (A (r, in), B (out, r)) as float32, PEFT orientation."""
    data = files[info.weights_file]
    digest = hashlib.sha256(data).hexdigest()
    if digest != info.weights_sha256:
        raise ValueError(f"{info.weights_file}: expected sha256 {info.weights_sha256}, got {digest}")
    sides: dict[tuple[int, str], dict[str, np.ndarray]] = {}
    for name, array in _decode(info.weights_file, data).items():
        block, module, side = _parse_name(info.format, name, info.weights_file)
        # mlx-lm's a/b are the transposes of PEFT's A/B.
        sides.setdefault((block, module), {})[side] = array.T if info.format == "mlx" else array
    return {
        f"layers.{block}.{module}": (_read_only(s["a"]), _read_only(s["b"]))
        for (block, module), s in sorted(sides.items(), key=lambda item: (item[0][0], PROJECTIONS.index(item[0][1])))
    }


def _read_only(array: np.ndarray) -> np.ndarray:
    # Decoded adapters are shared by every stack that uses them (through the adapter cache,
    # and by reference in each stack's parts): nobody may write into one.
    array = np.ascontiguousarray(array)
    array.flags.writeable = False
    return array


# --- files and config -------------------------------------------------------------------


def _detect_layout(files: Mapping[str, bytes]) -> Layout:
    names = sorted(files)
    for name in names:
        if name.lower().endswith(PICKLE_SUFFIXES):
            raise AdapterRejected("pickle_not_allowed", f"{name}: pickle files are refused; upload safetensors")
    present = [layout for layout, weights in WEIGHTS_FILES.items() if weights in files]
    if len(present) == 2:
        raise AdapterRejected(
            "mixed_layouts",
            f"expected one layout, got both {WEIGHTS_FILES['mlx']} (mlx-lm) and {WEIGHTS_FILES['peft']} (PEFT)",
        )
    if not present:
        raise AdapterRejected(
            "missing_file",
            f"expected {WEIGHTS_FILES['mlx']} (mlx-lm) or {WEIGHTS_FILES['peft']} (PEFT), got {names or 'no files'}",
        )
    layout = present[0]
    if CONFIG_FILE not in files:
        raise AdapterRejected("missing_file", f"{CONFIG_FILE}: expected next to {WEIGHTS_FILES[layout]}, got {names}")
    extra = [name for name in names if name not in (CONFIG_FILE, WEIGHTS_FILES[layout])]
    if extra:
        raise AdapterRejected(
            "unexpected_file", f"{extra[0]}: expected only {WEIGHTS_FILES[layout]} and {CONFIG_FILE}, got {names}"
        )
    return layout


def _parse_config(layout: Layout, raw: bytes) -> _Config:
    try:
        config = json.loads(raw)
    except (UnicodeDecodeError, ValueError) as exc:
        raise AdapterRejected("bad_config", f"{CONFIG_FILE}: expected JSON, got a parse error: {exc}") from None
    if not isinstance(config, dict):
        raise AdapterRejected("bad_config", f"{CONFIG_FILE}: expected a JSON object, got {type(config).__name__}")
    other: Layout = "peft" if layout == "mlx" else "mlx"
    if _config_layout(config) == other:
        raise AdapterRejected(
            "mixed_layouts",
            f"{CONFIG_FILE}: expected a {LABELS[layout]} config for {WEIGHTS_FILES[layout]}, got a {LABELS[other]} one",
        )
    return _mlx_config(config) if layout == "mlx" else _peft_config(config)


def _config_layout(config: dict[str, Any]) -> Layout | None:
    if "peft_type" in config:
        return "peft"
    if "lora_parameters" in config or "fine_tune_type" in config:
        return "mlx"
    return None


def _mlx_config(config: dict[str, Any]) -> _Config:
    kind = config.get("fine_tune_type", "lora")
    if kind != "lora":
        raise AdapterRejected("bad_config", f"{CONFIG_FILE}: expected fine_tune_type 'lora', got {kind!r}")
    params = config.get("lora_parameters")
    if not isinstance(params, dict):
        raise AdapterRejected("bad_config", f"{CONFIG_FILE}: expected lora_parameters to be an object, got {params!r}")
    # Older mlx-lm releases wrote lora_layers for the same setting.
    num_layers = config.get("num_layers", config.get("lora_layers"))
    if num_layers is not None and not _is_int(num_layers):
        raise AdapterRejected("bad_config", f"{CONFIG_FILE}: expected num_layers to be an integer, got {num_layers!r}")
    keys = params.get("keys")
    return _Config(
        rank=_positive_int(params, "rank", "lora_parameters.rank"),
        scale=_positive_number(params, "scale", "lora_parameters.scale"),
        target_modules=None if keys is None else _module_names(keys, "lora_parameters.keys"),
        base_model=_optional_str(config, "base_model") or _optional_str(config, "model"),
        num_layers=num_layers,
    )


def _peft_config(config: dict[str, Any]) -> _Config:
    if config.get("peft_type") != "LORA":
        found = config.get("peft_type")
        raise AdapterRejected("bad_config", f"{CONFIG_FILE}: expected peft_type 'LORA', got {found!r}")
    # Each of these changes what the tensors mean; applying them as plain LoRA would be wrong.
    for flag in ("use_dora", "fan_in_fan_out"):
        if config.get(flag):
            raise AdapterRejected("bad_config", f"{CONFIG_FILE}: expected {flag} false, got {config[flag]!r}")
    for pattern in ("rank_pattern", "alpha_pattern"):
        if config.get(pattern):
            raise AdapterRejected("bad_config", f"{CONFIG_FILE}: expected {pattern} empty, got {config[pattern]!r}")
    rslora = config.get("use_rslora", False)
    if not isinstance(rslora, bool):
        raise AdapterRejected("bad_config", f"{CONFIG_FILE}: expected use_rslora true or false, got {rslora!r}")
    rank = _positive_int(config, "r", "r")
    alpha = _positive_number(config, "lora_alpha", "lora_alpha")
    return _Config(
        rank=rank,
        scale=alpha / math.sqrt(rank) if rslora else alpha / rank,
        target_modules=_peft_targets(config.get("target_modules")),
        base_model=_optional_str(config, "base_model_name_or_path"),
        num_layers=None,
    )


def _peft_targets(value: Any) -> frozenset[str] | None:
    if value is None:
        return None
    if value == "all-linear":
        return frozenset(PROJECTIONS)
    return _module_names([value] if isinstance(value, str) else value, "target_modules")


def _module_names(values: Any, where: str) -> frozenset[str]:
    if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
        raise AdapterRejected("bad_config", f"{CONFIG_FILE}: expected {where} to be a list of names, got {values!r}")
    # Both "q_proj" and "self_attn.q_proj" (or longer paths) name the same projection.
    for value in values:
        if value.rsplit(".", 1)[-1] not in PARENTS:
            raise AdapterRejected(
                "target_modules_mismatch",
                f"{CONFIG_FILE}: expected {where} among {', '.join(PROJECTIONS)}, got {value!r}",
            )
    return frozenset(value.rsplit(".", 1)[-1] for value in values)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _positive_int(obj: dict[str, Any], key: str, where: str) -> int:
    value = obj.get(key)
    if not _is_int(value) or value <= 0:
        raise AdapterRejected("bad_config", f"{CONFIG_FILE}: expected {where} to be a positive integer, got {value!r}")
    return value


def _positive_number(obj: dict[str, Any], key: str, where: str) -> float:
    value = obj.get(key)
    if not (_is_int(value) or isinstance(value, float)) or not math.isfinite(value) or value <= 0:
        raise AdapterRejected("bad_config", f"{CONFIG_FILE}: expected {where} to be a positive number, got {value!r}")
    return float(value)


def _optional_str(obj: dict[str, Any], key: str) -> str | None:
    value = obj.get(key)
    if value is not None and not isinstance(value, str):
        raise AdapterRejected("bad_config", f"{CONFIG_FILE}: expected {key} to be a string, got {value!r}")
    return value or None


def _check_base_model(named: str | None, spec: ModelSpec) -> None:
    if named is not None and _model_key(named) != _model_key(spec.name):
        raise AdapterRejected(
            "base_model_mismatch", f"{CONFIG_FILE}: expected base model {spec.name!r}, got {named!r}"
        )


def _model_key(name: str) -> str:
    # "HuggingFaceTB/SmolLM2-135M-Instruct", "/models/smollm2-135m-instruct/" and
    # "mlx-community/SmolLM2-135M-Instruct-8bit" all name the same base weights.
    last = name.strip().rstrip("/").rsplit("/", 1)[-1].lower()
    return _VARIANT_SUFFIX.sub("", last)


# --- safetensors container --------------------------------------------------------------


def _read_header(file_name: str, data: bytes) -> list[_Tensor]:
    def bad(message: str) -> AdapterRejected:
        return AdapterRejected("bad_safetensors", f"{file_name}: {message}")

    if len(data) < 8:
        raise bad(f"truncated: expected at least 8 bytes, got {len(data)}")
    (length,) = struct.unpack_from("<Q", data, 0)
    if length > len(data) - 8:
        raise bad(f"header length {length} is past the end of the file: expected at most {len(data) - 8}")
    if length > MAX_HEADER_BYTES:
        raise bad(f"expected a header of at most {MAX_HEADER_BYTES} bytes, got {length}")
    try:
        header = json.loads(bytes(data[8 : 8 + length]).decode("utf-8"), object_pairs_hook=_unique_keys)
    except (UnicodeDecodeError, ValueError) as exc:
        raise bad(f"expected a JSON header, got a parse error: {exc}") from None
    if not isinstance(header, dict):
        raise bad(f"expected a JSON object header, got {type(header).__name__}")
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise bad(f"expected __metadata__ to map names to strings, got {_short(metadata)}")
    if not header:
        raise bad("expected at least one tensor, got none")
    tensors = [_tensor_entry(file_name, name, entry) for name, entry in header.items()]
    _check_offsets(bad, tensors, len(data) - 8 - length)
    return tensors


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # json.loads keeps the last of duplicate keys silently; two tensors with one name is corrupt.
    keys = [key for key, _ in pairs]
    duplicates = sorted({key for key in keys if keys.count(key) > 1})
    if duplicates:
        raise ValueError(f"duplicate keys {duplicates}")
    return dict(pairs)


def _tensor_entry(file_name: str, name: str, entry: Any) -> _Tensor:
    def bad(message: str) -> AdapterRejected:
        return AdapterRejected("bad_safetensors", f"{file_name}: tensor {name!r}: {message}")

    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
        raise bad(f"expected an object with dtype, shape and data_offsets, got {_short(entry)}")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        raise bad(f"expected shape to be a list of non-negative integers, got {_short(shape)}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) and o >= 0 for o in offsets)):
        raise bad(f"expected data_offsets [begin, end], got {_short(offsets)}")
    if offsets[0] > offsets[1]:
        raise bad(f"expected data_offsets begin <= end, got {offsets}")
    if dtype not in DTYPE_SIZES:
        raise AdapterRejected("bad_dtype", f"{name}: expected dtype F32, F16 or BF16, got {_short(dtype)}")
    size = math.prod(shape) * DTYPE_SIZES[dtype]
    if offsets[1] - offsets[0] != size:
        raise bad(f"expected {size} bytes for {dtype} {shape}, got data_offsets {offsets}")
    return _Tensor(name=name, dtype=dtype, shape=tuple(shape), start=offsets[0], end=offsets[1])


def _check_offsets(bad: Any, tensors: list[_Tensor], data_length: int) -> None:
    ordered = sorted(tensors, key=lambda t: (t.start, t.end))
    # Checked first: a truncated file should say so, not report the gap it leaves.
    for tensor in ordered:
        if tensor.end > data_length:
            raise bad(
                f"tensor {tensor.name!r} ends at byte {tensor.end}, past the end of the data: "
                f"expected at most {data_length} (is the file truncated?)"
            )
    # The library insists that tensors tile the data exactly, with no gaps, overlaps or tail.
    position = 0
    for tensor in ordered:
        if tensor.start != position:
            raise bad(f"tensor {tensor.name!r}: expected data to start at byte {position}, got {tensor.start}")
        position = tensor.end
    if position != data_length:
        raise bad(f"expected tensors to cover all {data_length} data bytes, got {position}")


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _decode(file_name: str, data: bytes) -> dict[str, np.ndarray]:
    try:
        entries = safetensors.deserialize(bytes(data))
    except Exception as exc:  # noqa: BLE001 - the header checks above should make this unreachable
        raise AdapterRejected("bad_safetensors", f"{file_name}: expected a safetensors file, got {exc}") from None
    return {name: _to_float32(e["dtype"], e["shape"], e["data"]) for name, e in entries}


def _to_float32(dtype: str, shape: list[int], raw: bytes) -> np.ndarray:
    if dtype == "BF16":
        # numpy has no bfloat16; its bits are the top half of a float32.
        bits = np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16
        return bits.view(np.float32).reshape(shape)
    return np.frombuffer(raw, dtype="<f4" if dtype == "F32" else "<f2").astype(np.float32).reshape(shape)


# --- tensors against the model ----------------------------------------------------------


def _parse_name(layout: Layout, name: str, file_name: str) -> tuple[int, str, str]:
    match = _TENSOR_NAMES[layout].fullmatch(name)
    if match is None:
        other: Layout = "peft" if layout == "mlx" else "mlx"
        if _TENSOR_NAMES[other].fullmatch(name):
            raise AdapterRejected(
                "mixed_layouts",
                f"{name}: expected {LABELS[layout]} tensor names in {file_name}, got a {LABELS[other]} name",
            )
        raise AdapterRejected("unknown_tensor", f"{name}: expected a LoRA tensor name like {_EXAMPLES[layout]!r}")
    block, parent, module, side = match.groups()
    if PARENTS.get(module) != parent:
        known = ", ".join(f"{PARENTS[m]}.{m}" for m in PROJECTIONS)
        raise AdapterRejected("unknown_tensor", f"{name}: expected a projection among {known}, got {parent}.{module}")
    return int(block), module, side.lower()


def _pair_tensors(layout: Layout, tensors: Iterable[_Tensor]) -> dict[tuple[int, str], tuple[_Tensor, _Tensor]]:
    sides: dict[tuple[int, str], dict[str, _Tensor]] = {}
    for tensor in tensors:
        block, module, side = _parse_name(layout, tensor.name, WEIGHTS_FILES[layout])
        sides.setdefault((block, module), {})[side] = tensor
    pairs = {}
    for key, found in sorted(sides.items()):
        if len(found) == 1:
            [(side, tensor)] = found.items()
            partner = {"a": "b", "b": "a"}[side]
            raise AdapterRejected("unpaired_tensor", f"{tensor.name}: expected its lora_{partner} partner, found none")
        pairs[key] = (found["a"], found["b"])
    return pairs


def _check_num_layers(config: _Config, spec: ModelSpec) -> None:
    if config.num_layers is not None and config.num_layers > spec.num_hidden_layers:
        raise AdapterRejected(
            "layer_out_of_range",
            f"{CONFIG_FILE}: expected num_layers at most {spec.num_hidden_layers} for {spec.name}, "
            f"got {config.num_layers}",
        )


def _check_block(tensor: _Tensor, block: int, spec: ModelSpec, config: _Config) -> None:
    total = spec.num_hidden_layers
    if block >= total:
        raise AdapterRejected(
            "layer_out_of_range", f"{tensor.name}: expected a block index below {total} for {spec.name}, got {block}"
        )
    # mlx-lm wraps only the last num_layers blocks (all of them when <= 0); weights for
    # earlier blocks would be dropped silently on load.
    first = total - config.num_layers if config.num_layers and config.num_layers > 0 else 0
    if block < first:
        raise AdapterRejected(
            "layer_out_of_range",
            f"{tensor.name}: expected a block in {first}..{total - 1} (num_layers {config.num_layers}), got {block}",
        )


def _check_shapes(layout: Layout, a: _Tensor, b: _Tensor, module_shape: tuple[int, int], rank: int) -> None:
    in_features, out_features = module_shape
    for tensor, side, features in ((a, "a", in_features), (b, "b", out_features)):
        rank_axis = _RANK_AXIS[(layout, side)]
        expected = (rank, features) if rank_axis == 0 else (features, rank)
        if len(tensor.shape) != 2 or tensor.shape[1 - rank_axis] != features:
            raise AdapterRejected("shape_mismatch", f"{tensor.name}: expected shape {expected}, got {tensor.shape}")
        if tensor.shape[rank_axis] != rank:
            raise AdapterRejected(
                "rank_mismatch",
                f"{tensor.name}: expected rank {rank} (from {CONFIG_FILE}), got shape {tensor.shape}",
            )


def _check_targets(config: _Config, present: set[str]) -> None:
    if config.target_modules is not None and config.target_modules != present:
        raise AdapterRejected(
            "target_modules_mismatch",
            f"{CONFIG_FILE}: expected target modules {sorted(present)} (those with tensors), "
            f"got {sorted(config.target_modules)}",
        )


def _check_finite(arrays: Mapping[str, np.ndarray]) -> None:
    for name, array in arrays.items():
        finite = np.isfinite(array)
        if not finite.all():
            bad = int(finite.size - np.count_nonzero(finite))
            raise AdapterRejected("not_finite", f"{name}: expected finite values, got {bad} NaN or Inf")


# --- writers (fixtures and tests) --------------------------------------------------------


def peft_files(
    canonical: Canonical,
    rank: int,
    alpha: float,
    target_modules: Iterable[str],
    base_model: str | None = None,
) -> dict[str, bytes]:
    """PEFT adapter files for `canonical`, written as given (no validation: tests make bad ones too)."""
    tensors = {}
    for key, (a, b) in canonical.items():
        prefix = f"base_model.model.model.{_module_path(key)}"
        tensors[f"{prefix}.lora_A.weight"] = np.ascontiguousarray(a)
        tensors[f"{prefix}.lora_B.weight"] = np.ascontiguousarray(b)
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": rank,
        "lora_alpha": alpha,
        "lora_dropout": 0.0,
        "target_modules": sorted(target_modules),
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
        "fan_in_fan_out": False,
        "base_model_name_or_path": base_model,
    }
    return {
        WEIGHTS_FILES["peft"]: safetensors.numpy.save(tensors, metadata={"format": "pt"}),
        CONFIG_FILE: json.dumps(config, indent=2).encode(),
    }


def mlx_files(
    canonical: Canonical,
    rank: int,
    scale: float,
    target_modules: Iterable[str],
    base_model: str | None = None,
    num_layers: int = -1,
) -> dict[str, bytes]:
    """mlx-lm adapter files for `canonical` (A, B are transposed into mlx-lm's a, b)."""
    tensors = {}
    for key, (a, b) in canonical.items():
        prefix = f"model.{_module_path(key)}"
        tensors[f"{prefix}.lora_a"] = np.ascontiguousarray(np.asarray(a).T)
        tensors[f"{prefix}.lora_b"] = np.ascontiguousarray(np.asarray(b).T)
    keys = [f"{PARENTS[m]}.{m}" if m in PARENTS else m for m in sorted(target_modules)]
    params = {"rank": rank, "scale": scale, "dropout": 0.0, "keys": keys}
    config: dict[str, Any] = {"fine_tune_type": "lora", "num_layers": num_layers, "lora_parameters": params}
    if base_model is not None:
        config["model"] = base_model
    return {
        WEIGHTS_FILES["mlx"]: safetensors.numpy.save(tensors, metadata={"format": "mlx"}),
        CONFIG_FILE: json.dumps(config, indent=2).encode(),
    }


def write_peft(
    path_dir: Path,
    canonical: Canonical,
    rank: int,
    alpha: float,
    target_modules: Iterable[str],
    base_model: str | None = None,
) -> None:
    _write(path_dir, peft_files(canonical, rank, alpha, target_modules, base_model))


def write_mlx(
    path_dir: Path,
    canonical: Canonical,
    rank: int,
    scale: float,
    target_modules: Iterable[str],
    base_model: str | None = None,
    num_layers: int = -1,
) -> None:
    _write(path_dir, mlx_files(canonical, rank, scale, target_modules, base_model, num_layers))


def _module_path(key: str) -> str:
    match = _CANONICAL_KEY.fullmatch(key)
    if match is None or match.group(2) not in PARENTS:
        raise ValueError(f"canonical key: expected 'layers.<i>.<module>' with a known module, got {key!r}")
    block, module = match.groups()
    return f"layers.{block}.{PARENTS[module]}.{module}"


def _write(path_dir: Path, files: Mapping[str, bytes]) -> None:
    directory = Path(path_dir)
    directory.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (directory / name).write_bytes(data)

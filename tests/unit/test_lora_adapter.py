import hashlib
import json
import math
import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fixtures import make_adapter  # noqa: E402
from fixtures.make_adapter import make_adapter_files, random_canonical  # noqa: E402
from inference.lora import (
    AdapterInfo,
    AdapterRejected,
    mlx_files,
    parse_adapter,
    peft_files,
    to_canonical,
    write_mlx,
    write_peft,
)
from inference.models import SMOLLM2_135M_INSTRUCT as SPEC

REASONS = {
    "pickle_not_allowed", "mixed_layouts", "missing_file", "unexpected_file", "bad_config", "bad_safetensors",
    "bad_dtype", "unknown_tensor", "unpaired_tensor", "layer_out_of_range", "shape_mismatch", "rank_mismatch",
    "rank_over_limit", "not_finite", "target_modules_mismatch", "base_model_mismatch",
}
PEFT_WEIGHTS = "adapter_model.safetensors"
MLX_WEIGHTS = "adapters.safetensors"
CONFIG = "adapter_config.json"
PEFT_Q_A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
PEFT_Q_B = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"


def parse(files, max_rank=64):
    return parse_adapter(files, SPEC, max_rank=max_rank)


def rejected(files, reason, match, max_rank=64):
    with pytest.raises(AdapterRejected, match=match) as caught:
        parse(files, max_rank)
    assert caught.value.reason == reason
    return caught.value


def with_config(files, **changes):
    config = json.loads(files[CONFIG])
    config.update(changes)
    return {**files, CONFIG: json.dumps(config).encode()}


def safetensors_bytes(header: dict, data: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


def raw_tensors(tensors: dict[str, tuple[str, tuple[int, ...], bytes]]) -> bytes:
    """A safetensors file built by hand, so tests can use dtypes numpy cannot write (BF16)."""
    header, data = {}, b""
    for name, (dtype, shape, raw) in tensors.items():
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    return safetensors_bytes(header, data)


def bf16_bits(array: np.ndarray) -> bytes:
    return (np.ascontiguousarray(array, dtype=np.float32).view(np.uint32) >> 16).astype("<u2").tobytes()


def split_file(data: bytes) -> tuple[dict, bytes]:
    (length,) = struct.unpack_from("<Q", data)
    return json.loads(data[8 : 8 + length]), data[8 + length :]


def one_pair(a: np.ndarray, b: np.ndarray, **config) -> dict[str, bytes]:
    files = peft_files({"layers.0.q_proj": (a, b)}, a.shape[0], 2.0 * a.shape[0], ["q_proj"], None)
    return with_config(files, **config) if config else files


# --- accepted adapters -----------------------------------------------------------------


def test_a_peft_adapter_is_accepted_with_its_rank_scale_modules_and_layers():
    info = parse(make_adapter_files("peft", rank=8, modules=("v_proj", "q_proj", "down_proj"), layers=(3, 1)))
    assert info.format == "peft"
    assert (info.rank, info.scale) == (8, 2.0)
    assert info.target_modules == ("down_proj", "q_proj", "v_proj")
    assert info.layers == (1, 3)
    assert (info.weights_file, info.config_file) == (PEFT_WEIGHTS, CONFIG)


def test_an_mlx_adapter_is_accepted_with_its_rank_scale_modules_and_layers():
    info = parse(make_adapter_files("mlx", rank=4, modules=("k_proj", "o_proj", "gate_proj", "up_proj")))
    assert info.format == "mlx"
    assert (info.rank, info.scale) == (4, 2.0)
    assert info.target_modules == ("gate_proj", "k_proj", "o_proj", "up_proj")
    assert info.layers == (0, 1)
    assert (info.weights_file, info.config_file) == (MLX_WEIGHTS, CONFIG)


def test_mlx_and_peft_files_of_the_same_weights_give_equal_canonical_arrays():
    modules = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    original = random_canonical(SPEC, 4, modules, (0, 29), seed=7)
    mlx = mlx_files(original, 4, 2.0, modules)
    peft = peft_files(original, 4, 8.0, modules)
    from_mlx, from_peft = to_canonical(mlx, parse(mlx)), to_canonical(peft, parse(peft))
    assert list(from_mlx) == list(from_peft) == list(original)
    for key, (a, b) in original.items():
        for got in (from_mlx[key], from_peft[key]):
            np.testing.assert_array_equal(got[0], a)
            np.testing.assert_array_equal(got[1], b)


def test_canonical_arrays_are_float32_in_peft_orientation():
    files = make_adapter_files("mlx", rank=4, modules=("v_proj", "down_proj"), layers=(2,))
    canonical = to_canonical(files, parse(files))
    a, b = canonical["layers.2.v_proj"]
    assert (a.dtype, a.shape, b.dtype, b.shape) == (np.float32, (4, 576), np.float32, (192, 4))
    a, b = canonical["layers.2.down_proj"]
    assert (a.shape, b.shape) == ((4, 1536), (576, 4))
    assert a.flags.c_contiguous and b.flags.c_contiguous


def test_the_same_seed_gives_the_same_bytes_and_another_seed_different_ones():
    assert make_adapter_files("peft", seed=3) == make_adapter_files("peft", seed=3)
    assert make_adapter_files("peft", seed=3)[PEFT_WEIGHTS] != make_adapter_files("peft", seed=4)[PEFT_WEIGHTS]


@pytest.mark.parametrize("layout", ["peft", "mlx"])
def test_the_sha256s_are_those_hashlib_computes_over_the_uploaded_bytes(layout):
    files = make_adapter_files(layout)
    info = parse(files)
    assert info.weights_sha256 == hashlib.sha256(files[info.weights_file]).hexdigest()
    assert info.config_sha256 == hashlib.sha256(files[CONFIG]).hexdigest()


def test_the_parameter_count_is_every_element_of_every_tensor():
    info = parse(make_adapter_files("peft", rank=4, modules=("q_proj", "v_proj"), layers=(0, 1)))
    per_layer = 4 * 576 + 576 * 4 + 4 * 576 + 192 * 4
    assert info.num_parameters == 2 * per_layer


def test_peft_scale_is_alpha_over_rank_and_alpha_over_root_rank_with_rslora():
    files = make_adapter_files("peft", rank=16)
    assert parse(with_config(files, lora_alpha=32)).scale == 2.0
    assert parse(with_config(files, lora_alpha=32, use_rslora=True)).scale == 8.0


def test_f16_weights_are_accepted_and_widened_to_float32():
    original = random_canonical(SPEC, 4, ["q_proj"], [0], seed=1)
    half = {key: (a.astype(np.float16), b.astype(np.float16)) for key, (a, b) in original.items()}
    files = peft_files(half, 4, 8, ["q_proj"])
    a, b = to_canonical(files, parse(files))["layers.0.q_proj"]
    assert a.dtype == np.float32
    np.testing.assert_array_equal(a, half["layers.0.q_proj"][0].astype(np.float32))


def test_bf16_weights_are_accepted_and_decoded_from_their_top_sixteen_bits():
    a = np.full((4, 576), 0.5, dtype=np.float32)
    b = np.full((576, 4), -1.25, dtype=np.float32)
    weights = raw_tensors({PEFT_Q_A: ("BF16", a.shape, bf16_bits(a)), PEFT_Q_B: ("BF16", b.shape, bf16_bits(b))})
    files = {**one_pair(a, b), PEFT_WEIGHTS: weights}
    got_a, got_b = to_canonical(files, parse(files))["layers.0.q_proj"]
    np.testing.assert_array_equal(got_a, a)
    np.testing.assert_array_equal(got_b, b)


@pytest.mark.parametrize(
    "name",
    [
        "smollm2-135m-instruct",
        "HuggingFaceTB/SmolLM2-135M-Instruct",
        "mlx-community/SmolLM2-135M-Instruct-8bit",
        "/home/me/models/SmolLM2-135M-Instruct/",
        "",
        None,
    ],
)
def test_the_default_base_model_is_accepted_under_any_of_its_names(name):
    parse(with_config(make_adapter_files("peft"), base_model_name_or_path=name))
    parse(with_config(make_adapter_files("mlx"), model=name))


def test_written_adapter_folders_parse_like_the_bytes_they_hold(tmp_path):
    canonical = random_canonical(SPEC, 2, ["o_proj"], [5], seed=2)
    write_peft(tmp_path / "peft", canonical, 2, 4.0, ["o_proj"], "HuggingFaceTB/SmolLM2-135M-Instruct")
    write_mlx(tmp_path / "mlx", canonical, 2, 2.0, ["o_proj"], "smollm2-135m-instruct")
    for folder in ("peft", "mlx"):
        files = {p.name: p.read_bytes() for p in (tmp_path / folder).iterdir()}
        info = parse(files)
        assert (info.rank, info.scale, info.layers, info.target_modules) == (2, 2.0, (5,), ("o_proj",))


def test_the_cli_writes_an_adapter_that_parses(tmp_path):
    argv = ["--layout", "mlx", "--rank", "2", "--modules", "up_proj", "--layers", "4", "--out", str(tmp_path)]
    assert make_adapter.main(argv) == 0
    files = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert parse(files).target_modules == ("up_proj",)


def test_to_canonical_refuses_files_other_than_those_the_info_describes():
    info = parse(make_adapter_files("peft", seed=1))
    with pytest.raises(ValueError, match=f"expected sha256 {info.weights_sha256}, got"):
        to_canonical(make_adapter_files("peft", seed=2), info)


def test_adapter_info_is_a_frozen_value():
    info = parse(make_adapter_files("peft"))
    with pytest.raises(AttributeError):
        info.rank = 1  # type: ignore[misc]
    assert isinstance(info, AdapterInfo)


# --- rejected uploads ------------------------------------------------------------------


@pytest.mark.parametrize("name", ["adapter_model.bin", "adapters.pt", "weights.PKL", "model.pth"])
def test_a_pickle_file_is_refused_even_next_to_valid_files(name):
    files = {**make_adapter_files("peft"), name: b"\x80\x04pickled"}
    error = rejected(files, "pickle_not_allowed", "pickle files are refused; upload safetensors")
    assert str(error) == f"{name}: pickle files are refused; upload safetensors"


def test_a_pickle_only_peft_upload_is_refused_as_pickle():
    files = {"adapter_model.bin": b"\x80\x04", CONFIG: make_adapter_files("peft")[CONFIG]}
    rejected(files, "pickle_not_allowed", "adapter_model.bin: pickle files are refused")


def test_weights_files_of_both_layouts_are_refused_as_mixed():
    files = {**make_adapter_files("peft"), MLX_WEIGHTS: make_adapter_files("mlx")[MLX_WEIGHTS]}
    rejected(files, "mixed_layouts", "expected one layout, got both adapters.safetensors")


def test_a_peft_config_next_to_mlx_weights_is_refused_as_mixed():
    files = {**make_adapter_files("mlx"), CONFIG: make_adapter_files("peft")[CONFIG]}
    rejected(files, "mixed_layouts", "expected a mlx-lm config for adapters.safetensors, got a PEFT one")


def test_mlx_tensor_names_in_a_peft_weights_file_are_refused_as_mixed():
    files = {**make_adapter_files("peft"), PEFT_WEIGHTS: make_adapter_files("mlx")[MLX_WEIGHTS]}
    rejected(files, "mixed_layouts", "expected PEFT tensor names in adapter_model.safetensors, got a mlx-lm name")


def test_weights_without_a_config_are_refused():
    files = make_adapter_files("peft")
    del files[CONFIG]
    rejected(files, "missing_file", "adapter_config.json: expected next to adapter_model.safetensors")


def test_a_config_without_weights_is_refused():
    rejected({CONFIG: b"{}"}, "missing_file", r"expected adapters.safetensors \(mlx-lm\) or adapter_model")


def test_an_extra_file_is_refused():
    files = {**make_adapter_files("mlx"), "README.md": b"# notes"}
    rejected(files, "unexpected_file", "README.md: expected only adapters.safetensors and adapter_config.json")


@pytest.mark.parametrize(
    ("config", "match"),
    [
        (b"{not json", "expected JSON, got a parse error"),
        (b"\xff\xfe\x00", "expected JSON, got a parse error"),
        (b"[1, 2]", "expected a JSON object, got list"),
        (b'{"peft_type": "IA3", "r": 4, "lora_alpha": 8}', "expected peft_type 'LORA', got 'IA3'"),
        (b'{"peft_type": "LORA", "r": "4", "lora_alpha": 8}', "expected r to be a positive integer, got '4'"),
        (b'{"peft_type": "LORA", "r": 4, "lora_alpha": NaN}', "expected lora_alpha to be a positive number, got nan"),
        (b'{"peft_type": "LORA", "r": 4, "lora_alpha": 8, "use_dora": true}', "expected use_dora false, got True"),
        (
            b'{"peft_type": "LORA", "r": 4, "lora_alpha": 8, "alpha_pattern": {"q_proj": 2}}',
            "expected alpha_pattern empty",
        ),
        (
            b'{"peft_type": "LORA", "r": 4, "lora_alpha": 8, "base_model_name_or_path": 7}',
            "expected base_model_name_or_path to be a string, got 7",
        ),
    ],
)
def test_a_peft_config_that_is_not_valid_lora_json_is_refused(config, match):
    rejected({**make_adapter_files("peft"), CONFIG: config}, "bad_config", match)


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"fine_tune_type": "dora"}, "expected fine_tune_type 'lora', got 'dora'"),
        ({"lora_parameters": None}, "expected lora_parameters to be an object, got None"),
        ({"lora_parameters": {"rank": 4}}, "expected lora_parameters.scale to be a positive number, got None"),
        ({"num_layers": "all"}, "expected num_layers to be an integer, got 'all'"),
    ],
)
def test_an_mlx_config_that_is_not_valid_lora_json_is_refused(changes, match):
    rejected(with_config(make_adapter_files("mlx"), **changes), "bad_config", match)


def test_a_safetensors_file_cut_in_half_is_refused_as_truncated():
    files = make_adapter_files("peft")
    files[PEFT_WEIGHTS] = files[PEFT_WEIGHTS][: len(files[PEFT_WEIGHTS]) // 2]
    rejected(files, "bad_safetensors", r"past the end of the data: expected at most \d+ \(is the file truncated\?\)")


def test_a_header_length_larger_than_the_file_is_refused():
    files = make_adapter_files("peft")
    data = files[PEFT_WEIGHTS]
    files[PEFT_WEIGHTS] = struct.pack("<Q", len(data) * 10) + data[8:]
    rejected(files, "bad_safetensors", rf"header length {len(data) * 10} is past the end of the file")


@pytest.mark.parametrize(
    ("weights", "match"),
    [
        (b"", "truncated: expected at least 8 bytes, got 0"),
        (b"\x05\x00\x00", "truncated: expected at least 8 bytes, got 3"),
        (struct.pack("<Q", 5) + b"{oops", "expected a JSON header, got a parse error"),
        (struct.pack("<Q", 2) + b"[]", "expected a JSON object header, got list"),
        (safetensors_bytes({}, b""), "expected at least one tensor, got none"),
        (safetensors_bytes({"__metadata__": {"format": 1}}, b""), "expected __metadata__ to map names to strings"),
    ],
)
def test_a_malformed_safetensors_container_is_refused(weights, match):
    rejected({**make_adapter_files("peft"), PEFT_WEIGHTS: weights}, "bad_safetensors", match)


def test_a_duplicated_tensor_name_in_the_header_is_refused():
    entry = '{"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}'
    raw = f'{{"{PEFT_Q_A}": {entry}, "{PEFT_Q_A}": {entry}}}'.encode()
    weights = struct.pack("<Q", len(raw)) + raw + b"\0" * 4
    rejected({**make_adapter_files("peft"), PEFT_WEIGHTS: weights}, "bad_safetensors", "duplicate keys")


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda e: e["data_offsets"].__setitem__(1, e["data_offsets"][1] + 4), "expected .* bytes for F32"),
        (lambda e: e.update(shape=[4, "576"]), "expected shape to be a list of non-negative integers"),
        (lambda e: e.update(data_offsets=[8]), r"expected data_offsets \[begin, end\], got \[8\]"),
        (lambda e: e.update(data_offsets=e["data_offsets"][::-1]), "expected data_offsets begin <= end"),
        (lambda e: e.pop("shape"), "expected an object with dtype, shape and data_offsets"),
    ],
)
def test_a_tensor_entry_with_wrong_shape_or_offsets_is_refused(edit, match):
    files = make_adapter_files("peft")
    header, data = split_file(files[PEFT_WEIGHTS])
    edit(header[PEFT_Q_A])
    files[PEFT_WEIGHTS] = safetensors_bytes(header, data)
    rejected(files, "bad_safetensors", match)


def test_offsets_past_the_end_of_the_data_are_refused():
    files = make_adapter_files("peft")
    header, data = split_file(files[PEFT_WEIGHTS])
    start, end = header[PEFT_Q_A]["data_offsets"]
    header[PEFT_Q_A]["data_offsets"] = [len(data), len(data) + end - start]
    files[PEFT_WEIGHTS] = safetensors_bytes(header, data)
    rejected(files, "bad_safetensors", f"ends at byte {len(data) + end - start}, past the end of the data")


def test_overlapping_tensors_are_refused():
    files = make_adapter_files("peft", modules=("q_proj",), layers=(0,))
    header, data = split_file(files[PEFT_WEIGHTS])
    header[PEFT_Q_B]["data_offsets"] = header[PEFT_Q_A]["data_offsets"]
    files[PEFT_WEIGHTS] = safetensors_bytes(header, data)
    rejected(files, "bad_safetensors", "expected data to start at byte 9216, got 0")


@settings(max_examples=300, deadline=None)
@given(cut=st.integers(min_value=0), position=st.integers(min_value=0), byte=st.integers(0, 255))
def test_any_truncation_or_corrupted_byte_is_accepted_or_rejected_never_a_crash(cut, position, byte):
    files = make_adapter_files("peft", rank=1, modules=("k_proj",), layers=(0,))
    data = bytearray(files[PEFT_WEIGHTS])
    # Mostly the header, where a corrupt byte changes the structure rather than a weight.
    data[position % min(len(data), 400)] = byte
    for weights in (bytes(data), bytes(data[: cut % len(data)])):
        try:
            parse({**files, PEFT_WEIGHTS: weights})
        except AdapterRejected as error:
            assert error.reason in REASONS


def test_bytes_after_the_last_tensor_are_refused():
    files = make_adapter_files("peft")
    files[PEFT_WEIGHTS] += b"\0" * 16
    rejected(files, "bad_safetensors", "expected tensors to cover all")


@pytest.mark.parametrize(("dtype", "size"), [("F64", 8), ("I8", 1), ("Q4_K", 1)])
def test_a_dtype_other_than_f32_f16_or_bf16_is_refused(dtype, size):
    a, b = random_canonical(SPEC, 4, ["q_proj"], [0], seed=0)["layers.0.q_proj"]
    weights = raw_tensors({PEFT_Q_A: (dtype, a.shape, b"\0" * a.size * size), PEFT_Q_B: ("F32", b.shape, b.tobytes())})
    files = {**one_pair(a, b), PEFT_WEIGHTS: weights}
    rejected(files, "bad_dtype", f"{PEFT_Q_A}: expected dtype F32, F16 or BF16, got '{dtype}'")


@pytest.mark.parametrize(
    "name",
    [
        "lm_head.weight",
        "base_model.model.model.layers.0.self_attn.rotary_emb.lora_A.weight",
        "base_model.model.model.layers.0.mlp.q_proj.lora_A.weight",
        "base_model.model.model.layers.01.self_attn.q_proj.lora_A.weight",
        "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector",
    ],
)
def test_a_tensor_that_is_not_lora_a_or_b_of_a_known_module_is_refused(name):
    a, b = random_canonical(SPEC, 4, ["q_proj"], [0], seed=0)["layers.0.q_proj"]
    weights = raw_tensors(
        {
            PEFT_Q_A: ("F32", a.shape, a.tobytes()),
            PEFT_Q_B: ("F32", b.shape, b.tobytes()),
            name: ("F32", (2,), b"\0" * 8),
        }
    )
    rejected({**one_pair(a, b), PEFT_WEIGHTS: weights}, "unknown_tensor", name.replace(".", r"\.") + ": expected")


def test_an_a_tensor_without_its_b_is_refused():
    a, b = random_canonical(SPEC, 4, ["q_proj"], [0], seed=0)["layers.0.q_proj"]
    weights = raw_tensors({PEFT_Q_A: ("F32", a.shape, a.tobytes())})
    rejected({**one_pair(a, b), PEFT_WEIGHTS: weights}, "unpaired_tensor", "expected its lora_b partner, found none")


def test_a_b_tensor_without_its_a_is_refused():
    files = make_adapter_files("mlx", modules=("v_proj",), layers=(0,))
    header, data = split_file(files[MLX_WEIGHTS])
    a_name = "model.layers.0.self_attn.v_proj.lora_a"
    b_name = "model.layers.0.self_attn.v_proj.lora_b"
    b_start, b_end = header[b_name]["data_offsets"]
    weights = raw_tensors({b_name: ("F32", tuple(header[b_name]["shape"]), data[b_start:b_end])})
    assert a_name in header
    rejected({**files, MLX_WEIGHTS: weights}, "unpaired_tensor", f"{b_name}: expected its lora_a partner")


def test_a_block_index_past_the_models_last_block_is_refused():
    files = make_adapter_files("peft", layers=(29, 30))
    rejected(files, "layer_out_of_range", r"layers\.30\..*expected a block index below 30 for smollm2-135m-instruct")


def test_mlx_weights_outside_the_last_num_layers_blocks_are_refused():
    files = with_config(make_adapter_files("mlx", layers=(0, 29)), num_layers=2)
    rejected(files, "layer_out_of_range", r"expected a block in 28\.\.29 \(num_layers 2\), got 0")


def test_an_mlx_num_layers_beyond_the_model_is_refused():
    files = with_config(make_adapter_files("mlx"), num_layers=32)
    rejected(files, "layer_out_of_range", "expected num_layers at most 30 for smollm2-135m-instruct, got 32")


def test_a_tensor_shaped_for_another_model_is_refused_naming_expected_and_actual_shapes():
    a = np.zeros((4, 512), np.float32)
    b = np.zeros((512, 4), np.float32)
    rejected(one_pair(a, b), "shape_mismatch", rf"{PEFT_Q_A}: expected shape \(4, 576\), got \(4, 512\)")


def test_an_mlx_tensor_in_peft_orientation_is_refused_as_a_shape_mismatch():
    original = random_canonical(SPEC, 4, ["q_proj"], [0], seed=0)
    a, b = original["layers.0.q_proj"]
    files = mlx_files({"layers.0.q_proj": (a.T, b.T)}, 4, 2.0, ["q_proj"])
    rejected(files, "shape_mismatch", r"lora_a: expected shape \(576, 4\), got \(4, 576\)")


def test_a_one_dimensional_tensor_is_refused_as_a_shape_mismatch():
    a, b = random_canonical(SPEC, 4, ["q_proj"], [0], seed=0)["layers.0.q_proj"]
    weights = raw_tensors({PEFT_Q_A: ("F32", (a.size,), a.tobytes()), PEFT_Q_B: ("F32", b.shape, b.tobytes())})
    rejected({**one_pair(a, b), PEFT_WEIGHTS: weights}, "shape_mismatch", r"expected shape \(4, 576\), got \(2304,\)")


def test_tensors_whose_rank_differs_from_the_config_are_refused():
    files = with_config(make_adapter_files("peft", rank=4), r=8)
    rejected(files, "rank_mismatch", r"expected rank 8 \(from adapter_config.json\), got shape \(4, 576\)")


def test_a_and_b_of_different_ranks_are_refused():
    a = np.zeros((4, 576), np.float32)
    b = np.zeros((576, 8), np.float32)
    rejected(one_pair(a, b), "rank_mismatch", rf"{PEFT_Q_B}: expected rank 4 .*got shape \(576, 8\)")


@pytest.mark.parametrize("layout", ["peft", "mlx"])
def test_a_rank_over_the_limit_is_refused(layout):
    rejected(make_adapter_files(layout, rank=8), "rank_over_limit", "expected rank at most 4, got 8", max_rank=4)


@pytest.mark.parametrize("layout", ["peft", "mlx"])
def test_a_nan_weight_is_refused_naming_the_tensor(layout):
    files = make_adapter_files(layout, nan=True)
    rejected(files, "not_finite", r"layers\.0\.self_attn\.q_proj\.lora_[aA].*: expected finite values, got 1 NaN")


@pytest.mark.parametrize("value", [math.inf, -math.inf])
def test_an_infinite_weight_is_refused_naming_the_tensor(value):
    a, b = random_canonical(SPEC, 4, ["q_proj"], [0], seed=0)["layers.0.q_proj"]
    b[3, 1] = value
    rejected(one_pair(a, b), "not_finite", rf"{PEFT_Q_B}: expected finite values, got 1 NaN or Inf")


def test_a_float16_overflow_to_infinity_is_refused():
    a, b = random_canonical(SPEC, 4, ["q_proj"], [0], seed=0)["layers.0.q_proj"]
    a[0, :3] = 1e6  # past float16's largest finite value
    with np.errstate(over="ignore"):
        half = (a.astype(np.float16), b.astype(np.float16))
    files = peft_files({"layers.0.q_proj": half}, 4, 8, ["q_proj"])
    rejected(files, "not_finite", f"{PEFT_Q_A}: expected finite values, got 3 NaN or Inf")


@pytest.mark.parametrize(("bits", "what"), [(0x7FC0, "NaN"), (0x7F80, "+Inf"), (0xFF80, "-Inf")])
def test_a_bf16_nan_or_inf_is_refused(bits, what):
    a = np.zeros((4, 576), np.float32)
    b = np.zeros((576, 4), np.float32)
    raw_b = bytearray(bf16_bits(b))
    raw_b[10:12] = struct.pack("<H", bits)
    weights = raw_tensors({PEFT_Q_A: ("BF16", a.shape, bf16_bits(a)), PEFT_Q_B: ("BF16", b.shape, bytes(raw_b))})
    rejected({**one_pair(a, b), PEFT_WEIGHTS: weights}, "not_finite", f"{PEFT_Q_B}: expected finite values, got 1")


@pytest.mark.parametrize(
    ("layout", "changes"),
    [
        ("peft", {"target_modules": ["q_proj", "k_proj"]}),
        ("peft", {"target_modules": ["q_proj", "v_proj", "o_proj"]}),
        ("peft", {"target_modules": "all-linear"}),
        ("mlx", {"lora_parameters": {"rank": 4, "scale": 2.0, "keys": ["self_attn.q_proj"]}}),
    ],
)
def test_config_target_modules_that_do_not_match_the_tensors_are_refused(layout, changes):
    files = with_config(make_adapter_files(layout, modules=("q_proj", "v_proj")), **changes)
    rejected(files, "target_modules_mismatch", r"expected target modules \['q_proj', 'v_proj'\] \(those with tensors\)")


def test_a_config_target_module_this_service_cannot_apply_is_refused():
    files = with_config(make_adapter_files("peft"), target_modules=["q_proj", "v_proj", "lm_head"])
    rejected(files, "target_modules_mismatch", "expected target_modules among q_proj, .*, got 'lm_head'")


def test_target_modules_given_as_paths_match_by_their_last_component():
    paths = ["self_attn.q_proj", "model.layers.0.self_attn.v_proj"]
    files = with_config(make_adapter_files("peft"), target_modules=paths)
    assert parse(files).target_modules == ("q_proj", "v_proj")


@pytest.mark.parametrize(
    ("layout", "key"),
    [("peft", "base_model_name_or_path"), ("mlx", "model"), ("mlx", "base_model")],
)
def test_an_adapter_for_another_base_model_is_refused(layout, key):
    files = with_config(make_adapter_files(layout), **{key: "meta-llama/Llama-3.2-1B-Instruct"})
    rejected(
        files,
        "base_model_mismatch",
        "expected base model 'smollm2-135m-instruct', got 'meta-llama/Llama-3.2-1B-Instruct'",
    )


def test_a_bigger_sibling_of_the_default_model_is_another_base_model():
    files = with_config(make_adapter_files("peft"), base_model_name_or_path="HuggingFaceTB/SmolLM2-360M-Instruct")
    rejected(files, "base_model_mismatch", "got 'HuggingFaceTB/SmolLM2-360M-Instruct'")

import json
from pathlib import Path

import pytest

from inference.models import (
    DEFAULT_MODEL,
    SMOLLM2_135M_INSTRUCT,
    ModelCatalog,
    ModelSpec,
    UnknownModel,
)

# SmolLM2-135M-Instruct's own config.json, trimmed: it has no head_dim (576 / 9 = 64).
SMOLLM2_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "vocab_size": 49152,
    "rope_theta": 100000,
    "tie_word_embeddings": True,
}

TINY_CONFIG = {
    "model_type": "llama",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "vocab_size": 256,
}


def model_folder(root: Path, config: dict, weights: bool = True) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text(json.dumps(config))
    if weights:
        (root / "model.safetensors").write_bytes(b"\0" * 4096)
    return root


def test_the_default_model_is_smollm2_135m_instruct():
    spec = ModelCatalog(Path("/nonexistent")).get(DEFAULT_MODEL)
    assert spec == ModelSpec(
        name="smollm2-135m-instruct",
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        head_dim=64,
        vocab_size=49152,
    )


@pytest.mark.parametrize(
    ("module", "shape"),
    [
        ("q_proj", (576, 576)),
        ("k_proj", (576, 192)),
        ("v_proj", (576, 192)),
        ("o_proj", (576, 576)),
        ("gate_proj", (576, 1536)),
        ("up_proj", (576, 1536)),
        ("down_proj", (1536, 576)),
    ],
)
def test_module_shapes_are_in_and_out_features_of_each_projection(module, shape):
    assert SMOLLM2_135M_INSTRUCT.module_shape(module) == shape


def test_an_unknown_module_is_a_value_error_naming_the_known_ones():
    with pytest.raises(ValueError, match=r"expected one of q_proj, k_proj, .*down_proj, got 'lm_head'"):
        SMOLLM2_135M_INSTRUCT.module_shape("lm_head")


def test_a_hugging_face_llama_config_gives_the_same_spec_as_the_built_in_one():
    assert ModelSpec.from_hf_config(DEFAULT_MODEL, SMOLLM2_CONFIG) == SMOLLM2_135M_INSTRUCT


def test_head_dim_defaults_to_hidden_over_heads_and_kv_heads_to_heads():
    spec = ModelSpec.from_hf_config("tiny", TINY_CONFIG)
    assert (spec.head_dim, spec.num_key_value_heads) == (16, 4)


def test_an_explicit_head_dim_wins_over_the_default():
    spec = ModelSpec.from_hf_config("wide", {**TINY_CONFIG, "head_dim": 32})
    assert spec.module_shape("q_proj") == (64, 128)
    assert spec.module_shape("o_proj") == (128, 64)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"model_type": "gpt2"}, "expected model_type 'llama', got 'gpt2'"),
        ({"hidden_size": None}, "expected hidden_size to be a positive integer, got None"),
        ({"num_hidden_layers": True}, "expected num_hidden_layers to be a positive integer, got True"),
        ({"vocab_size": 0}, "expected vocab_size to be a positive integer, got 0"),
        ({"num_key_value_heads": 3}, "divisible by num_key_value_heads, got 4 and 3"),
        ({"hidden_size": 66}, "expected hidden_size divisible by num_attention_heads, got 66 and 4"),
    ],
)
def test_a_config_that_is_not_a_usable_llama_config_is_refused(change, message):
    with pytest.raises(ValueError, match=message):
        ModelSpec.from_hf_config("tiny", {**TINY_CONFIG, **change})


def test_the_catalog_lists_only_the_default_before_anything_is_registered(tmp_path):
    assert ModelCatalog(tmp_path / "models").names() == [DEFAULT_MODEL]


def test_a_registered_local_model_is_listed_and_its_spec_read_from_its_config(tmp_path):
    catalog = ModelCatalog(tmp_path / "models")
    spec = catalog.register_local("tiny-llama", model_folder(tmp_path / "src", TINY_CONFIG))
    assert catalog.get("tiny-llama") == spec == ModelSpec.from_hf_config("tiny-llama", TINY_CONFIG)
    assert catalog.names() == [DEFAULT_MODEL, "tiny-llama"]


def test_registering_copies_no_weights_only_a_link_to_the_config(tmp_path):
    source = model_folder(tmp_path / "src", TINY_CONFIG)
    ModelCatalog(tmp_path / "models").register_local("tiny", source)
    registered = tmp_path / "models" / "tiny"
    assert [p.name for p in registered.iterdir()] == ["config.json"]
    assert (registered / "config.json").resolve() == (source / "config.json").resolve()


def test_registering_a_name_again_points_it_at_the_new_folder(tmp_path):
    catalog = ModelCatalog(tmp_path / "models")
    catalog.register_local("tiny", model_folder(tmp_path / "one", TINY_CONFIG))
    catalog.register_local("tiny", model_folder(tmp_path / "two", {**TINY_CONFIG, "num_hidden_layers": 3}))
    assert catalog.get("tiny").num_hidden_layers == 3


@pytest.mark.parametrize("name", ["", "Tiny", "../tiny", "a/b", "-tiny", ".tiny", "t" * 101, "tiny model"])
def test_a_model_name_outside_the_allowed_pattern_is_refused(tmp_path, name):
    with pytest.raises(ValueError, match="model name: expected to match"):
        ModelCatalog(tmp_path / "models").register_local(name, model_folder(tmp_path / "src", TINY_CONFIG))


def test_the_built_in_name_cannot_be_registered_over(tmp_path):
    with pytest.raises(ValueError, match="other than the built-in"):
        ModelCatalog(tmp_path / "models").register_local(DEFAULT_MODEL, model_folder(tmp_path / "src", SMOLLM2_CONFIG))


def test_a_folder_without_config_json_is_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="expected a model folder with config.json, found none"):
        ModelCatalog(tmp_path / "models").register_local("tiny", tmp_path / "empty")


def test_a_folder_with_a_non_llama_config_is_refused_and_nothing_registered(tmp_path):
    catalog = ModelCatalog(tmp_path / "models")
    with pytest.raises(ValueError, match="expected model_type 'llama'"):
        catalog.register_local("gpt", model_folder(tmp_path / "src", {**TINY_CONFIG, "model_type": "gpt2"}))
    assert catalog.names() == [DEFAULT_MODEL]


def test_a_config_that_is_not_json_is_refused(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="expected JSON"):
        ModelCatalog(tmp_path / "models").register_local("tiny", tmp_path / "src")


def test_an_unknown_model_is_a_key_error_that_lists_the_known_names(tmp_path):
    catalog = ModelCatalog(tmp_path / "models")
    catalog.register_local("tiny", model_folder(tmp_path / "src", TINY_CONFIG))
    with pytest.raises(KeyError) as caught:
        catalog.get("llama-3-70b")
    assert isinstance(caught.value, UnknownModel)
    assert str(caught.value) == "unknown model: expected one of smollm2-135m-instruct, tiny, got 'llama-3-70b'"


def test_a_path_like_name_is_unknown_rather_than_read_from_disk(tmp_path):
    model_folder(tmp_path / "outside", TINY_CONFIG)
    with pytest.raises(UnknownModel):
        ModelCatalog(tmp_path / "models").get("../outside")

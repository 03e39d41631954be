"""From a persona in the read models to its assembled stack; bad adapters refused before any generation."""

from __future__ import annotations

import msgspec
import numpy as np
import pytest

from factories import BASE_MODEL, attach, create_persona_with_genome
from fixtures.make_adapter import make_adapter_files
from genome_service.domain.common import DomainError
from genome_service.domain.genome import LayerFacts
from genome_service.domain.layer import LAYER, TraitType
from genome_service.domain.persona import PERSONA, AssignGenome, GenomeFacts
from genome_service.eventstore.records import NO_METADATA
from genome_service.services.bootstrap import Services
from genome_service.services.layers import AdapterManifest, LayerDetails, adapter_manifest, register_layer
from genome_service.services.stacks import StackResolver
from inference.lora.adapter import AdapterRejected, parse_adapter, to_canonical
from inference.lora.stack import assemble
from inference.models import SMOLLM2_135M_INSTRUCT, ModelSpec

SPEC = SMOLLM2_135M_INSTRUCT
TINY = ModelSpec(
    name="tiny", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, head_dim=16, vocab_size=512,
)  # fmt: skip


def upload(services: Services, files: dict[str, bytes], name: str = "layer") -> str:
    details = LayerDetails(name=name, base_model=BASE_MODEL, trait_type=TraitType.DOMAIN_EXPERTISE)
    return register_layer(services, "alice", details, files, NO_METADATA).aggregate.state.layer_id


def persona_with(services: Services, layers: list[tuple[str, float]], persona_id: str = "p1") -> str:
    create_persona_with_genome(services, persona_id, f"g-{persona_id}")
    services.commands.execute(PERSONA, persona_id, AssignGenome(GenomeFacts(f"g-{persona_id}", persona_id, False)))
    for layer_id, weight in layers:
        attach(services, f"g-{persona_id}", LayerFacts(layer_id, BASE_MODEL, deprecated=False), weight)
    return persona_id


def rot(services: Services, layer_id: str, files: dict[str, bytes]) -> None:
    """Overwrite a stored adapter's blobs in place, as a failing disk or a hand edit would."""
    row = services.repository.load(LAYER, layer_id).state
    manifest: AdapterManifest = adapter_manifest(services, row.adapter_sha256)
    by_role = {"config" if n.endswith(".json") else "weights": sha for n, sha in manifest.files.items()}
    for name, data in files.items():
        services.blobs.path(by_role["config" if name.endswith(".json") else "weights"]).write_bytes(data)


def test_a_personas_stack_is_its_genomes_layers_in_order_assembled_once(services: Services) -> None:
    peft = make_adapter_files("peft", rank=4, seed=1)
    mlx = make_adapter_files("mlx", rank=8, modules=("q_proj", "down_proj"), layers=(3,), seed=2)
    first, second = upload(services, peft, "first"), upload(services, mlx, "second")
    persona = persona_with(services, [(first, 0.5), (second, 0.25)])
    resolver = StackResolver(services, SPEC)

    system, layers = resolver.persona(persona)
    assert layers == [(first, 0.5), (second, 0.25)]
    stack = resolver.stack(layers)
    assert stack is not None and stack.layers == ((first, 0.5), (second, 0.25))
    expected = assemble([
        (layer_id, weight, to_canonical(files, info), info.scale)
        for (layer_id, weight), files in zip(layers, (peft, mlx), strict=True)
        for info in [parse_adapter(files, SPEC, max_rank=64)]
    ])  # fmt: skip
    assert stack.modules.keys() == expected.modules.keys()
    for key, (a, b) in expected.modules.items():
        np.testing.assert_array_equal(stack.modules[key][0], a)
        np.testing.assert_array_equal(stack.modules[key][1], b)
    assert resolver.stack(layers) is stack and resolver.stacks.hits == 1


def test_a_persona_without_a_genome_speaks_with_the_base_model(services: Services) -> None:
    create_persona_with_genome(services, "p2", "g2")  # the genome is never assigned
    resolver = StackResolver(services, SPEC)
    system, layers = resolver.persona("p2")
    assert layers == [] and resolver.stack(layers) is None


@pytest.mark.parametrize(
    ("layers", "code", "message"),
    [
        ([("nope", 0.5)], "layer_not_found", "layer 'nope' does not exist"),
        ([("x", 1.5)], "weight_out_of_range", r"weight must be a finite number in \[0, 1\] \(got 1.5\)"),
    ],
)
def test_unknown_layers_and_bad_weights_are_refused(services: Services, layers, code, message) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(DomainError, match=message) as refused:
        StackResolver(services, SPEC).stack(layers)
    assert refused.value.rule == code


def test_an_unknown_persona_is_refused(services: Services) -> None:
    with pytest.raises(DomainError, match="persona 'ghost' does not exist"):
        StackResolver(services, SPEC).persona("ghost")


def test_a_layer_for_another_base_model_is_refused(services: Services) -> None:
    layer_id = upload(services, make_adapter_files("peft", seed=3))
    with pytest.raises(DomainError, match=f"layer '{layer_id}' was trained for 'smollm2-135m-instruct'; the engine runs 'tiny'"):
        StackResolver(services, TINY).stack([(layer_id, 1.0)])


def _truncated(files: dict[str, bytes]) -> dict[str, bytes]:
    return {name: data[:-10] if name.endswith(".safetensors") else data for name, data in files.items()}


def _with_config(files: dict[str, bytes], **changes: object) -> dict[str, bytes]:
    config = msgspec.json.decode(files["adapter_config.json"]) | changes
    return files | {"adapter_config.json": msgspec.json.encode(config)}


@pytest.mark.parametrize(
    ("stored", "reason", "message"),
    [
        (make_adapter_files("peft", seed=4, nan=True), "not_finite", "expected finite values, got 1 NaN or Inf"),
        (_truncated(make_adapter_files("peft", seed=4)), "bad_safetensors", "past the end of the data"),
        (
            _with_config(make_adapter_files("peft", seed=4, spec=TINY), base_model_name_or_path=None),
            "shape_mismatch",
            r"q_proj.lora_A.weight: expected shape \(4, 576\), got \(4, 64\)",
        ),
        (
            _with_config(make_adapter_files("peft", seed=4), base_model_name_or_path="meta-llama/Llama-3-8B"),
            "base_model_mismatch",
            "expected base model 'smollm2-135m-instruct', got 'meta-llama/Llama-3-8B'",
        ),
        (
            _with_config(make_adapter_files("peft", seed=4), target_modules=["q_proj", "k_proj", "v_proj"]),
            "target_modules_mismatch",
            r"expected target modules \['q_proj', 'v_proj'\] \(those with tensors\)",
        ),
    ],
)
def test_a_stored_adapter_that_went_bad_is_refused_before_use(services: Services, stored, reason, message) -> None:  # type: ignore[no-untyped-def]
    layer_id = upload(services, make_adapter_files("peft", seed=4))
    rot(services, layer_id, stored)
    with pytest.raises(AdapterRejected, match=f"layer '{layer_id}': .*{message}") as refused:
        StackResolver(services, SPEC).stack([(layer_id, 1.0)])
    assert refused.value.reason == reason


def test_an_adapter_over_a_tightened_rank_limit_is_refused(services: Services) -> None:
    layer_id = upload(services, make_adapter_files("peft", rank=16, seed=5))
    tightened = msgspec.structs.replace(services, settings=msgspec.structs.replace(services.settings, max_lora_rank=8))
    with pytest.raises(AdapterRejected, match="expected rank at most 8, got 16") as refused:
        StackResolver(tightened, SPEC).stack([(layer_id, 1.0)])
    assert refused.value.reason == "rank_over_limit"

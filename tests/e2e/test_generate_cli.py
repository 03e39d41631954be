"""`genome-service model ...` and `generate` as a user runs them, on the pulled default model."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from factories import BASE_MODEL, attach, create_persona_with_genome

from fixtures.make_adapter import make_adapter_files
from genome_service.domain.genome import LayerFacts
from genome_service.domain.layer import TraitType
from genome_service.domain.persona import PERSONA, AssignGenome, ChangePersonaProfile, GenomeFacts
from genome_service.eventstore.migrations import upgrade
from genome_service.eventstore.records import NO_METADATA
from genome_service.services.bootstrap import build
from genome_service.services.layers import LayerDetails, register_layer
from genome_service.settings import Settings

CLI = [sys.executable, "-m", "genome_service.cli"]
COMMANDS = [["model"], ["model", "pull"], ["model", "list"], ["model", "register"], ["generate"]]


def run(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture
def env(tmp_path: Path, default_model: Path) -> dict[str, str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("GENOME_")}
    return clean | {
        "GENOME_DATA_DIR": str(tmp_path / "data"), "GENOME_MODELS_DIR": str(default_model.parent),
        "GENOME_INFERENCE_BACKEND": "torch", "HF_HUB_OFFLINE": "1",
    }  # fmt: skip


@pytest.fixture
def persona(tmp_path: Path) -> str:
    """A persona with a system prompt and a one-layer genome, in a migrated SQLite database."""
    data = tmp_path / "data"
    data.mkdir()
    upgrade(f"sqlite:///{data / 'genome.db'}")
    services = build(Settings(data_dir=data))
    try:
        details = LayerDetails(name="calm", base_model=BASE_MODEL, trait_type=TraitType.DOMAIN_EXPERTISE)
        layer_id = register_layer(services, "alice", details, make_adapter_files("peft", seed=1), NO_METADATA).aggregate.state.layer_id
        create_persona_with_genome(services, "guide", "g1")
        services.commands.execute(PERSONA, "guide", ChangePersonaProfile(system_prompt="You are a concise geography tutor."))
        services.commands.execute(PERSONA, "guide", AssignGenome(GenomeFacts("g1", "guide", False)))
        attach(services, "g1", LayerFacts(layer_id, BASE_MODEL, deprecated=False), 0.5)
    finally:
        services.close()
    return "guide"


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_every_inference_command_has_help_with_an_example(command: list[str], env: dict[str, str]) -> None:
    result = run(*command, "--help", env=env)
    assert result.returncode == 0, result.stderr
    assert "Example: genome-service" in result.stdout


def test_model_pull_is_a_verified_no_op_and_list_shows_the_folder(env: dict[str, str], default_model: Path) -> None:
    pulled = run("--quiet", "model", "pull", env=env)
    assert pulled.returncode == 0, pulled.stderr
    listed = run("model", "list", env=env)
    assert listed.stdout.splitlines() == [f"smollm2-135m-instruct\tready\t{default_model}"]


def test_generate_streams_a_personas_answer(env: dict[str, str], persona: str) -> None:
    result = run("--quiet", "generate", "--persona", persona, "--max-tokens", "24", "What is the capital of France?", env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() and result.stderr == ""


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--layers", "nope:0.5"], "error: layer 'nope' does not exist"),
        (["--layers", "x:heavy"], "error: --layers: expected LAYER_ID:WEIGHT with a number for the weight, got 'x:heavy'"),
        (["--persona", "ghost"], "error: persona 'ghost' does not exist"),
        (["--persona", "a", "--layers", "b:1"], "error: give --persona or --layers, not both"),
        (["--top-p", "0"], r"error: top_p: expected a number in (0, 1], got 0.0"),
    ],
)
def test_bad_generate_input_exits_1_with_what_is_wrong(
    env: dict[str, str], persona: str, args: list[str], message: str
) -> None:
    result = run("generate", *args, "hello", env=env)
    assert result.returncode == 1 and result.stderr.strip() == message

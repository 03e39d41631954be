"""Small builders of realistic commands for tests and benchmarks."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys

from genome_service.domain.genome import GENOME, AttachLayer, CreateGenome, LayerFacts
from genome_service.domain.layer import LAYER, RegisterLayer, TraitType
from genome_service.domain.persona import PERSONA, CreatePersona
from genome_service.services.bootstrap import Services

BASE_MODEL = "smollm2-135m-instruct"


def register_layer(services: Services, layer_id: str, *, base_model: str = BASE_MODEL, owner: str = "alice") -> LayerFacts:
    services.commands.execute(
        LAYER,
        layer_id,
        RegisterLayer(
            layer_id=layer_id,
            owner=owner,
            name=f"layer {layer_id}",
            base_model=base_model,
            adapter_sha256=hashlib.sha256(layer_id.encode()).hexdigest(),
            adapter_format="peft",
            rank=8,
            target_modules=("q_proj", "v_proj"),
            trait_type=TraitType.DOMAIN_EXPERTISE,
            tags=("Math", "tutor"),
        ),
    )
    return LayerFacts(layer_id, base_model, deprecated=False)


def create_persona_with_genome(services: Services, persona_id: str, genome_id: str, *, owner: str = "alice") -> None:
    services.commands.execute(PERSONA, persona_id, CreatePersona(persona_id, owner, f"persona {persona_id}"))
    services.commands.execute(
        GENOME, genome_id, CreateGenome(genome_id, owner, persona_id, BASE_MODEL, f"genome {genome_id}")
    )


def attach(services: Services, genome_id: str, layer: LayerFacts, weight: float = 0.5) -> None:
    services.commands.execute(GENOME, genome_id, AttachLayer(layer, weight))


def run_until_killed(script: str, lines: int) -> list[str]:
    """Run ``script`` in a fresh Python process and SIGKILL it once it has printed ``lines`` lines."""
    writer = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    printed: list[str] = []
    try:
        assert writer.stdout is not None
        for line in writer.stdout:
            printed.append(line)
            if len(printed) == lines:
                os.kill(writer.pid, signal.SIGKILL)
                break
    finally:
        writer.kill()
        writer.wait(timeout=30)
    assert writer.returncode == -signal.SIGKILL, f"the writer exited by itself ({writer.returncode}) after {len(printed)} lines"
    return printed

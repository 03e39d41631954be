"""A writer process killed with SIGKILL loses nothing it reported as committed."""

from __future__ import annotations

from pathlib import Path

from factories import run_until_killed
from test_aggregates_and_projections import read_model_rows

from genome_service.services.bootstrap import Services

WRITER = """
import sys
sys.path.insert(0, {tests!r})
from factories import attach, create_persona_with_genome, register_layer
from genome_service.services.bootstrap import build
from genome_service.settings import Settings

services = build(Settings(database_url={url!r}, snapshot_every=7))
for n in range(1_000_000):
    create_persona_with_genome(services, f"p{{n}}", f"g{{n}}")
    layer = register_layer(services, f"l{{n}}")
    attach(services, f"g{{n}}", layer)
    print("committed", services.store.last_position(), flush=True)
"""


def test_every_reported_append_survives_sigkill_and_a_rebuild_equals_the_live_read_models(services: Services) -> None:
    script = WRITER.format(tests=str(Path(__file__).parents[1]), url=services.database.url)
    reported = [int(line.split()[1]) for line in run_until_killed(script, 40)]

    last = services.store.last_position()
    assert last >= reported[-1]
    events = [e for batch in services.store.iter_all() for e in batch]
    assert [e.position for e in events] == list(range(1, last + 1))
    live = read_model_rows(services)
    assert len(live["genomes"]) >= 40
    services.projector.rebuild()
    assert read_model_rows(services) == live

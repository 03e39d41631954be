"""Real databases for every test that persists: a SQLite file and a PostgreSQL schema.

PostgreSQL is found at GENOME_TEST_POSTGRES_URL (default: the CI server on
127.0.0.1:5432). Without one, its cases are skipped with the reason shown;
under CI=true a missing server is an error, never a skip.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from genome_service.eventstore.database import Database
from genome_service.eventstore.migrations import upgrade
from genome_service.services.bootstrap import Services, build
from genome_service.settings import Settings
from rag.embedder import SentenceTransformerEmbedder

# One converted default model per machine, shared by every test run: `scripts/test` pulls
# it here first (GENOME_MODELS_DIR overrides), so no test converts the GGUF itself.
MODELS_DIR = Path(os.environ.get("GENOME_MODELS_DIR") or Path(__file__).resolve().parent.parent / ".cache" / "models")
POSTGRES_URL = os.environ.get("GENOME_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
IN_CI = os.environ.get("CI", "").lower() == "true"


def _postgres_reachable() -> str | None:
    try:
        engine = sa.create_engine(POSTGRES_URL, connect_args={"connect_timeout": 3})
        with engine.connect():
            pass
        engine.dispose()
        return None
    except Exception as exc:  # noqa: BLE001 - any failure means "not reachable"
        return f"{type(exc).__name__}: {str(exc).splitlines()[0]}"


@pytest.fixture(scope="session")
def postgres_server() -> str:
    problem = _postgres_reachable()
    if problem is not None:
        if IN_CI:
            pytest.fail(f"CI=true but PostgreSQL at {POSTGRES_URL} is unreachable ({problem})")
        pytest.skip(f"PostgreSQL at {POSTGRES_URL} is unreachable ({problem})")
    return POSTGRES_URL


@pytest.fixture
def postgres_url(postgres_server: str) -> Iterator[str]:
    """A migrated, empty schema of its own, dropped after the test."""
    schema = f"t_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(postgres_server, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.exec_driver_sql(f"CREATE SCHEMA {schema}")
    url = sa.engine.make_url(postgres_server).update_query_dict({"options": f"-csearch_path={schema}"})
    rendered = url.render_as_string(hide_password=False)
    try:
        upgrade(rendered)
        yield rendered
    finally:
        with admin.connect() as connection:
            connection.exec_driver_sql(f"DROP SCHEMA {schema} CASCADE")
        admin.dispose()


@pytest.fixture
def sqlite_url(tmp_path) -> str:  # type: ignore[no-untyped-def]
    url = f"sqlite:///{tmp_path / 'genome.db'}"
    upgrade(url)
    return url


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def database_url(request: pytest.FixtureRequest) -> str:
    """Each test that takes this runs once on SQLite and once on PostgreSQL."""
    fixture = "sqlite_url" if request.param == "sqlite" else "postgres_url"
    return request.getfixturevalue(fixture)


@pytest.fixture
def database(database_url: str) -> Iterator[Database]:
    db = Database(database_url)
    yield db
    db.dispose()


@pytest.fixture
def services(database: Database, tmp_path) -> Iterator[Services]:  # type: ignore[no-untyped-def]
    yield build(Settings(data_dir=tmp_path, database_url=database.url, snapshot_every=5), database=database)


@pytest.fixture(scope="session")
def default_model() -> Path:
    """The pulled SmolLM2-135M-Instruct folder (pulled here once if `scripts/test` did not)."""
    from inference.pull import pull_default

    folder, _ = pull_default(MODELS_DIR)
    return folder


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama folder (fixtures/make_model.py) that transformers and mlx-lm load."""
    from fixtures.make_model import make_tiny_llama

    return make_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def embedder() -> SentenceTransformerEmbedder:
    """The bundled embedding model, loaded once for every test of the session that needs it."""
    return SentenceTransformerEmbedder()

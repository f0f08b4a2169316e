"""Alembic: one head; an empty database upgrades to head, matches the models, and downgrades to empty."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine, inspect

from app.migrate import alembic_config, downgrade, upgrade
from app.models import Base
from tests.conftest import _pg_url, create_database, drop_database


def test_single_head() -> None:
    script = ScriptDirectory.from_config(alembic_config("sqlite://"))
    assert len(script.get_heads()) == 1


def test_upgrade_empty_postgres_to_head_and_back() -> None:
    name = create_database()
    url = _pg_url(name).replace("postgresql://", "postgresql+psycopg://")
    engine = create_engine(url)
    try:
        upgrade(url)
        with engine.connect() as conn:
            diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
            assert diff == [], f"models and migrations disagree: {diff}"
            assert {"analyses", "layer_scores", "metrics", "artifacts", "api_keys"} <= set(inspect(conn).get_table_names())
        downgrade(url)
        with engine.connect() as conn:
            assert set(inspect(conn).get_table_names()) <= {"alembic_version"}
    finally:
        engine.dispose()
        drop_database(name)


def test_upgrade_sqlite_to_head_and_back(tmp_path) -> None:  # noqa: ANN001
    url = f"sqlite:///{tmp_path / 'm.db'}"
    upgrade(url)
    engine = create_engine(url)
    with engine.connect() as conn:
        assert "layer_scores" in inspect(conn).get_table_names()
    downgrade(url)
    with engine.connect() as conn:
        assert set(inspect(conn).get_table_names()) <= {"alembic_version"}
    engine.dispose()

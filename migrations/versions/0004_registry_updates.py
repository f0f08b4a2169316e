"""registry: the registry outbox (registry_updates) and a gate policy's registry actions

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-02 01:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _json() -> sa.types.TypeEngine:
    return sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql")


def upgrade() -> None:
    with op.batch_alter_table("gate_policies") as batch:
        batch.add_column(sa.Column("registry_actions", _json(), nullable=True))
    op.create_table(
        "registry_updates",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("project", sa.String(length=128), nullable=False),
        sa.Column("analysis_id", sa.String(length=36), nullable=False),
        sa.Column("target", sa.String(length=16), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("verdict_id", sa.String(length=36), nullable=True),
        sa.Column("dedupe_key", sa.String(length=128), nullable=True),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("next_attempt_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("result", _json(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("done_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(["analysis_id"], ["analyses.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("dedupe_key", name="uq_registry_updates_dedupe_key"),
    )
    op.create_index("ix_registry_updates_due", "registry_updates", ["state", "next_attempt_at"])
    op.create_index("ix_registry_updates_analysis", "registry_updates", ["analysis_id", "created_at"])


def downgrade() -> None:
    op.drop_index("ix_registry_updates_analysis", table_name="registry_updates")
    op.drop_index("ix_registry_updates_due", table_name="registry_updates")
    op.drop_table("registry_updates")
    with op.batch_alter_table("gate_policies") as batch:
        batch.drop_column("registry_actions")

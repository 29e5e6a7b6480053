"""Initial schema: jobs, variants, trials, metrics and the result views.

Revision ID: 0001
Revises:
Create Date: 2025-11-25
"""
from __future__ import annotations

from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

from ablate.store.views import VIEW_NAMES_0001, VIEWS_SQL_0001, drop_statements, statements

revision: str = "0001"
down_revision: Union[str, Sequence[str], None] = None
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    op.create_table(
        "jobs",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("name", sa.String(255), nullable=False),
        sa.Column("description", sa.Text(), nullable=False, server_default=""),
        sa.Column("spec_yaml", sa.Text(), nullable=False),
        sa.Column("spec_json", sa.Text(), nullable=False),
        sa.Column("baseline", sa.String(255), nullable=True),
        sa.Column("state", sa.String(32), nullable=False, server_default="running"),
        sa.Column("tracking_uri", sa.Text(), nullable=True),
        sa.Column("mlflow_experiment_id", sa.String(64), nullable=True),
        sa.Column("mlflow_parent_run_id", sa.String(64), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.UniqueConstraint("name", name="uq_jobs_name"),
    )
    op.create_table(
        "variants",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("job_id", sa.Integer(), sa.ForeignKey("jobs.id", ondelete="CASCADE"), nullable=False),
        sa.Column("name", sa.String(255), nullable=False),
        sa.Column("overrides_json", sa.Text(), nullable=False, server_default="{}"),
        sa.UniqueConstraint("job_id", "name", name="uq_variants_job_name"),
    )
    op.create_table(
        "trials",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("job_id", sa.Integer(), sa.ForeignKey("jobs.id", ondelete="CASCADE"), nullable=False),
        sa.Column("variant_id", sa.Integer(), sa.ForeignKey("variants.id", ondelete="CASCADE"), nullable=False),
        sa.Column("seed", sa.Integer(), nullable=False),
        sa.Column("hash", sa.String(128), nullable=False),
        sa.Column("state", sa.String(32), nullable=False, server_default="pending"),
        sa.Column("attempts", sa.Integer(), nullable=False, server_default=sa.text("0")),
        sa.Column("epoch", sa.Integer(), nullable=False, server_default=sa.text("0")),
        sa.Column("node", sa.String(255), nullable=True),
        sa.Column("device", sa.String(64), nullable=True),
        sa.Column("wall_seconds", sa.Double(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("mlflow_run_id", sa.String(64), nullable=True),
        sa.Column("config_json", sa.Text(), nullable=False),
        sa.Column("result_json", sa.Text(), nullable=True),
        sa.Column("reused_from", sa.Integer(), sa.ForeignKey("trials.id", ondelete="SET NULL"), nullable=True),
        sa.Column("checkpoint", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.UniqueConstraint("job_id", "variant_id", "seed", name="uq_trials_job_variant_seed"),
    )
    op.create_index("ix_trials_hash", "trials", ["hash"])
    op.create_table(
        "metrics",
        sa.Column("trial_id", sa.Integer(), sa.ForeignKey("trials.id", ondelete="CASCADE"), nullable=False),
        sa.Column("name", sa.String(255), nullable=False),
        sa.Column("step", sa.Integer(), nullable=False),
        sa.Column("epoch", sa.Integer(), nullable=False),
        sa.Column("value", sa.Double(), nullable=True),
        sa.Column("is_nan", sa.Boolean(), nullable=False, server_default=sa.false()),
        sa.PrimaryKeyConstraint("trial_id", "name", "step", name="pk_metrics"),
    )
    # the views: the text of dashboards/views.sql (driver-level execution: no bind-parameter parsing)
    bind = op.get_bind()
    for statement in statements(VIEWS_SQL_0001):
        bind.exec_driver_sql(statement)


def downgrade() -> None:
    bind = op.get_bind()
    for statement in drop_statements(VIEW_NAMES_0001):
        bind.exec_driver_sql(statement)
    op.drop_table("metrics")
    op.drop_index("ix_trials_hash", table_name="trials")
    op.drop_table("trials")
    op.drop_table("variants")
    op.drop_table("jobs")

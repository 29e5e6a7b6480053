"""Code fingerprints of trials and the driver lease of jobs.

``trials.code_fingerprint``: ``ablate.fingerprint.code_fingerprint()`` of the code that trains the trial
(NULL for trials recorded before this revision: their code is unknown, so they count as other
code). ``jobs.driver_token`` / ``jobs.driver_heartbeat_at``: the lease that lets one driver at a
time work on a job (see ``Store.claim_driver``). Columns are only added; nothing is renamed, and
the views are unchanged.

Revision ID: 0002
Revises: 0001
Create Date: 2025-12-01
"""
from __future__ import annotations

from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: Union[str, Sequence[str], None] = "0001"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    # plain ADD COLUMN (nullable, no default): native on SQLite and PostgreSQL, no table copy
    op.add_column("trials", sa.Column("code_fingerprint", sa.String(64), nullable=True))
    op.add_column("jobs", sa.Column("driver_token", sa.String(64), nullable=True))
    op.add_column("jobs", sa.Column("driver_heartbeat_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    # DROP COLUMN: PostgreSQL, and SQLite >= 3.35 (the views do not read these columns)
    op.drop_column("jobs", "driver_heartbeat_at")
    op.drop_column("jobs", "driver_token")
    op.drop_column("trials", "code_fingerprint")

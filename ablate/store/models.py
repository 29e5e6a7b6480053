"""SQLAlchemy 2.0 models of the results store (schema revision 0002).

The tables are created by the Alembic migrations in ``ablate/store/migrations``,
never by ``Base.metadata.create_all``; these models mirror them for the ORM.

Non-finite metric values: SQLite turns NaN into NULL and the two databases
disagree on infinities, so every non-finite value is stored uniformly as
``value = NULL, is_nan = TRUE`` (a diverged loss reads back as ``float('nan')``).
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from typing import Any, Optional

from sqlalchemy import (
    Boolean,
    DateTime,
    Double,
    ForeignKey,
    Integer,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    false,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

JOB_STATES = ("running", "finished", "interrupted", "cancelled", "failed")
TRIAL_STATES = ("pending", "running", "finished", "diverged", "failed", "cancelled", "reused")


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class UTCDateTime(TypeDecorator[datetime]):
    """An aware UTC datetime on both databases (SQLite keeps no time zone: naive means UTC)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            value = value.replace(tzinfo=timezone.utc)
        value = value.astimezone(timezone.utc)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=timezone.utc)
        return value.astimezone(timezone.utc)


class Base(DeclarativeBase):
    pass


class Job(Base):
    """One submitted job file (a name is unique; resubmitting updates its spec)."""

    __tablename__ = "jobs"
    __table_args__ = (UniqueConstraint("name", name="uq_jobs_name"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(255))
    description: Mapped[str] = mapped_column(Text, default="", server_default="")
    spec_yaml: Mapped[str] = mapped_column(Text)  # the submitted file, verbatim
    spec_json: Mapped[str] = mapped_column(Text)  # the validated spec as JSON
    baseline: Mapped[Optional[str]] = mapped_column(String(255))
    state: Mapped[str] = mapped_column(String(32), default="running", server_default="running")
    tracking_uri: Mapped[Optional[str]] = mapped_column(Text)
    mlflow_experiment_id: Mapped[Optional[str]] = mapped_column(String(64))
    mlflow_parent_run_id: Mapped[Optional[str]] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)
    # the driver lease (0002): the token of the driver that holds the job and its last heartbeat;
    # taken and renewed only by compare-and-set UPDATEs (Store.claim_driver / beat_driver)
    driver_token: Mapped[Optional[str]] = mapped_column(String(64))
    driver_heartbeat_at: Mapped[Optional[datetime]] = mapped_column(UTCDateTime)

    @property
    def spec(self) -> Any:
        return json.loads(self.spec_json)

    def __repr__(self) -> str:
        return f"Job(id={self.id}, name={self.name!r}, state={self.state!r})"


class Variant(Base):
    """A named set of overrides inside one job."""

    __tablename__ = "variants"
    __table_args__ = (UniqueConstraint("job_id", "name", name="uq_variants_job_name"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(255))
    overrides_json: Mapped[str] = mapped_column(Text, default="{}", server_default="{}")

    @property
    def overrides(self) -> dict[str, Any]:
        return json.loads(self.overrides_json)

    def __repr__(self) -> str:
        return f"Variant(id={self.id}, job_id={self.job_id}, name={self.name!r})"


class Trial(Base):
    """One (variant, seed) of a job: a single training run."""

    __tablename__ = "trials"
    __table_args__ = (UniqueConstraint("job_id", "variant_id", "seed", name="uq_trials_job_variant_seed"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    variant_id: Mapped[int] = mapped_column(ForeignKey("variants.id", ondelete="CASCADE"))
    seed: Mapped[int] = mapped_column(Integer)
    hash: Mapped[str] = mapped_column(String(128), index=True)
    state: Mapped[str] = mapped_column(String(32), default="pending", server_default="pending")
    attempts: Mapped[int] = mapped_column(Integer, default=0, server_default=text("0"))
    epoch: Mapped[int] = mapped_column(Integer, default=0, server_default=text("0"))  # last completed epoch
    node: Mapped[Optional[str]] = mapped_column(String(255))
    device: Mapped[Optional[str]] = mapped_column(String(64))
    wall_seconds: Mapped[Optional[float]] = mapped_column(Double)
    error: Mapped[Optional[str]] = mapped_column(Text)
    mlflow_run_id: Mapped[Optional[str]] = mapped_column(String(64))
    config_json: Mapped[str] = mapped_column(Text)  # the resolved trial config
    result_json: Mapped[Optional[str]] = mapped_column(Text)  # the final result dict
    reused_from: Mapped[Optional[int]] = mapped_column(ForeignKey("trials.id", ondelete="SET NULL"))
    checkpoint: Mapped[Optional[str]] = mapped_column(Text)  # where the last epoch's checkpoint lies (resume)
    # ablate.fingerprint.code_fingerprint() of the code that registered (and so trains) the trial; NULL: before 0002
    code_fingerprint: Mapped[Optional[str]] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)

    # many-to-one, loaded with the trial so that a detached Trial still knows its variant's name
    variant: Mapped[Variant] = relationship(lazy="joined", innerjoin=True)

    @property
    def variant_name(self) -> str:
        return self.variant.name

    @property
    def config(self) -> dict[str, Any]:
        return json.loads(self.config_json)

    @property
    def result(self) -> Optional[dict[str, Any]]:
        return None if self.result_json is None else json.loads(self.result_json)

    def __repr__(self) -> str:
        return (f"Trial(id={self.id}, job_id={self.job_id}, variant_id={self.variant_id}, seed={self.seed}, "
                f"state={self.state!r}, hash={self.hash!r})")


class Metric(Base):
    """One point of one named curve of one trial; ``(trial_id, name, step)`` is unique."""

    __tablename__ = "metrics"

    trial_id: Mapped[int] = mapped_column(ForeignKey("trials.id", ondelete="CASCADE"), primary_key=True)
    name: Mapped[str] = mapped_column(String(255), primary_key=True)  # "loss/box", "eval/AP", "lr", ...
    step: Mapped[int] = mapped_column(Integer, primary_key=True)
    epoch: Mapped[int] = mapped_column(Integer)
    value: Mapped[Optional[float]] = mapped_column(Double)  # NULL when not finite
    is_nan: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())

    def __repr__(self) -> str:
        return f"Metric(trial_id={self.trial_id}, name={self.name!r}, step={self.step}, value={self.value})"

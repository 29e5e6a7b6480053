"""The SQL results store: jobs, variants, trials and metric curves (SQLite or PostgreSQL).

    store = open_store("sqlite:///ablate.db")          # creates the schema in an empty database
    job = store.create_or_get_job("box_losses", description=..., spec_yaml=..., spec_json=...,
                                  baseline="ciou", tracking_uri="sqlite:///mlflow.db")
    trials = store.ensure_trials("box_losses", [{"variant": "ciou", "overrides": {...}, "seed": 0,
                                                 "hash": "...", "config": {...}}])
    store.add_metrics(trials[0].id, [("loss/box", 100, 1, 0.83), ("eval/AP", 100, 1, 0.12)])
    store.results("box_losses")                         # pandas, one row per trial (trial_results view)

The schema comes from the Alembic migrations in ``ablate/store/migrations``;
``upgrade(url)`` (``ablate db upgrade``) moves an existing store to this
ablate's revision. The views are documented in ``dashboards/views.sql``.
"""

from .db import DEFAULT_URL, SCHEMA_REVISION, VERSION_TABLE, StoreError, display_url, make_engine, upgrade
from .models import JOB_STATES, TRIAL_STATES, Base, Job, Metric, Trial, Variant
from .store import COCO_METRICS, Store, open_store

__all__ = [
    "COCO_METRICS",
    "DEFAULT_URL",
    "JOB_STATES",
    "SCHEMA_REVISION",
    "TRIAL_STATES",
    "VERSION_TABLE",
    "Base",
    "Job",
    "Metric",
    "Store",
    "StoreError",
    "Trial",
    "Variant",
    "display_url",
    "make_engine",
    "open_store",
    "upgrade",
]

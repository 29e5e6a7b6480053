"""Alembic migrations of the results store (run programmatically by ``ablate.store.db``)."""

"""Engines, schema revisions and migrations of the results store.

A store is any SQLAlchemy URL of SQLite (the default, ``sqlite:///ablate.db``)
or PostgreSQL. Its schema is created and changed only by the Alembic
migrations packaged in ``ablate/store/migrations``; they run programmatically
(no ``alembic.ini``). The revision lives in the table ``ablate_alembic_version``
rather than Alembic's usual ``alembic_version``, because MLflow keeps its own
Alembic revision in ``alembic_version`` and a team may point both at one
PostgreSQL database.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, NamedTuple

from sqlalchemy import Connection, Engine, create_engine, event, inspect
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError, SQLAlchemyError

DEFAULT_URL = "sqlite:///ablate.db"
SCHEMA_REVISION = "0002"  # head of ablate/store/migrations/versions (a test checks it)
VERSION_TABLE = "ablate_alembic_version"
MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
ABLATE_TABLES = ("jobs", "variants", "trials", "metrics")
SQLITE_BUSY_TIMEOUT_MS = 30_000
PG_CONNECT_TIMEOUT_S = 10
_PG_MIGRATION_LOCK = 0x61626C617465  # pg_advisory_xact_lock key ("ablate"): one migrator at a time


class StoreError(RuntimeError):
    """A store problem a user can act on; the message is one line."""


def parse_url(url: str) -> URL:
    """The SQLAlchemy URL of a store; ``postgresql://`` and ``postgres://`` mean psycopg 3."""
    try:
        u = make_url(url)
    except ArgumentError as e:
        raise StoreError(f"not a database URL: {url!r} (e.g. sqlite:///ablate.db or "
                         f"postgresql+psycopg://user@host:5432/db)") from e
    if u.drivername in ("postgresql", "postgres"):
        u = u.set(drivername="postgresql+psycopg")
    backend = u.get_backend_name()
    if backend not in ("sqlite", "postgresql"):
        raise StoreError(f"store {display_url(url)}: only sqlite and postgresql stores are supported")
    return u


def display_url(url: str | URL) -> str:
    """The URL for messages, password hidden."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return str(url)


def _sqlite_file(u: URL) -> Path | None:
    db = u.database
    if not db or db == ":memory:" or db.startswith("file:") or u.query.get("uri"):
        return None
    return Path(db)


def _on_sqlite_connect(dbapi_connection: Any, _record: Any) -> None:
    cur = dbapi_connection.cursor()
    try:
        cur.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")  # first: the WAL switch may wait
        cur.execute("PRAGMA journal_mode = WAL")  # readers never block the one writer (a no-op in memory)
        cur.execute("PRAGMA synchronous = NORMAL")  # safe with WAL; commits do not fsync each time
        cur.execute("PRAGMA foreign_keys = ON")
    finally:
        cur.close()


def make_engine(url: str, **kwargs: Any) -> Engine:
    """An engine for a store URL: SQLite in WAL mode with a busy timeout and foreign keys on;
    PostgreSQL with ``pool_pre_ping`` and a connect timeout (``PG_CONNECT_TIMEOUT_S`` unless the
    URL sets one).

    A SQLite file's parent folder is created when missing.
    """
    u = parse_url(url)
    if u.get_backend_name() == "sqlite":
        path = _sqlite_file(u)
        if path is not None:
            path.expanduser().parent.mkdir(parents=True, exist_ok=True)
        connect_args = dict(kwargs.pop("connect_args", {}))
        connect_args.setdefault("timeout", SQLITE_BUSY_TIMEOUT_MS / 1000)
        engine = create_engine(u, connect_args=connect_args, **kwargs)
        event.listen(engine, "connect", _on_sqlite_connect)
    else:
        # a pooled connection that a server restart killed is found by a ping at checkout and
        # replaced, instead of failing the next statement
        kwargs.setdefault("pool_pre_ping", True)
        connect_args = dict(kwargs.pop("connect_args", {}))
        # an unreachable server fails a connect in seconds (libpq waits forever by default), so
        # the store's retry (Store.retry_s) keeps its time budget
        if "connect_timeout" not in u.query:
            connect_args.setdefault("connect_timeout", PG_CONNECT_TIMEOUT_S)
        engine = create_engine(u, connect_args=connect_args, **kwargs)
    return engine


# --- migrations ---------------------------------------------------------------------------------

def alembic_config(connection: Connection | None = None, script_location: Path | None = None) -> Any:
    """An Alembic ``Config`` over the packaged migrations, bound to ``connection``."""
    from alembic.config import Config

    cfg = Config()
    location = str(script_location or MIGRATIONS_DIR)
    cfg.set_main_option("script_location", location.replace("%", "%%"))
    cfg.set_main_option("path_separator", "os")
    cfg.attributes["connection"] = connection
    cfg.attributes["version_table"] = VERSION_TABLE
    return cfg


def _script() -> Any:
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(alembic_config())


def head_revision() -> str:
    """The head revision of the migrations this ablate carries (``SCHEMA_REVISION``)."""
    return _script().get_current_head()


def known_revisions() -> set[str]:
    """Every revision of the migrations this ablate carries."""
    return {rev.revision for rev in _script().walk_revisions()}


def current_revision(connection: Connection) -> str | None:
    """The revision stamped in the database, or None when it has none."""
    from alembic.runtime.migration import MigrationContext

    ctx = MigrationContext.configure(connection, opts={"version_table": VERSION_TABLE})
    heads = ctx.get_current_heads()
    if len(heads) > 1:
        raise StoreError(f"store has several schema revisions ({', '.join(sorted(heads))}); repair it by hand")
    return heads[0] if heads else None


def _ablate_tables(connection: Connection) -> list[str]:
    present = set(inspect(connection).get_table_names())
    return [t for t in ABLATE_TABLES if t in present]


class SchemaStatus(NamedTuple):
    """Where a database stands against this ablate's migrations."""

    state: str  # "current", "empty", "older", "unknown" (newer ablate) or "unversioned" (foreign tables)
    revision: str | None  # the revision stamped in the database
    message: str | None  # one line, None when current


def schema_status(connection: Connection, url: str) -> SchemaStatus:
    """Compare the database's revision with the head of the migrations this ablate carries."""
    head = head_revision()
    rev = current_revision(connection)
    shown = display_url(url)
    fix = f"run `ablate db upgrade --store {shown}`"
    if rev == head:
        return SchemaStatus("current", rev, None)
    if rev is None:
        tables = _ablate_tables(connection)
        if tables:
            return SchemaStatus("unversioned", None, (
                f"store {shown} has tables {', '.join(tables)} but no ablate schema revision "
                f"(table {VERSION_TABLE}): they were not made by ablate's migrations; use another database"))
        return SchemaStatus("empty", None, f"store {shown} has no ablate schema: {fix}")
    if rev in known_revisions():
        return SchemaStatus("older", rev, f"store {shown} is at schema {rev}, this ablate needs {head}: {fix}")
    return SchemaStatus("unknown", rev, (
        f"store {shown} is at schema {rev}, unknown to this ablate (which needs {head}): "
        f"it was written by a newer ablate; upgrade ablate"))


@contextmanager
def _migration_connection(engine: Engine) -> Iterator[Connection]:
    """A connection inside one transaction that holds the store's migration lock.

    PostgreSQL: an advisory transaction lock (its DDL is transactional). SQLite:
    ``BEGIN IMMEDIATE`` takes the write lock up front, so the whole migration is
    one transaction and a second process waits (busy timeout) instead of failing.
    """
    with engine.connect() as conn:
        if engine.dialect.name == "sqlite":
            conn.exec_driver_sql("BEGIN IMMEDIATE")
        else:
            conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({_PG_MIGRATION_LOCK})")
        try:
            yield conn
        except BaseException:
            conn.rollback()
            raise
        else:
            conn.commit()


def upgrade(url: str, revision: str = "head") -> str:
    """Migrate the store at ``url`` to the head revision (creating it when empty); return the revision.

    Refuses (StoreError) a database with ablate-named tables but no revision, and
    one at a revision this ablate does not know. ``revision`` may name an older
    revision (tests, staged upgrades). On PostgreSQL it then grants the reader role
    ``ablate_reader`` SELECT on the store's tables and views, creating the role when
    the user may (``readonly.grant_reader``; the read commands use it).
    """
    u = parse_url(url)
    in_memory = u.get_backend_name() == "sqlite" and _sqlite_file(u) is None
    engine = make_engine(url) if in_memory else make_engine(url, poolclass=_null_pool())
    try:
        return upgrade_engine(engine, url, revision)
    finally:
        engine.dispose()


def upgrade_engine(engine: Engine, url: str, revision: str = "head") -> str:
    """``upgrade`` on an existing engine (``url`` only names the store in messages)."""
    try:
        with _migration_connection(engine) as conn:
            status = schema_status(conn, url)
            if status.state in ("unversioned", "unknown"):
                raise StoreError(status.message or f"store {display_url(url)}: cannot upgrade")
            from alembic import command

            command.upgrade(alembic_config(conn), revision)
            from .readonly import grant_reader

            grant_reader(conn)  # PostgreSQL: the read commands' role (after the migrations: views recreated)
            return current_revision(conn) or ""
    except StoreError:
        raise
    except SQLAlchemyError as e:
        raise StoreError(f"store {display_url(url)}: upgrade failed: {_one_line(e)}") from e


def _null_pool() -> Any:
    from sqlalchemy.pool import NullPool

    return NullPool


def _one_line(e: BaseException) -> str:
    msg = str(getattr(e, "orig", None) or e).strip().splitlines()
    return msg[0] if msg else type(e).__name__


def create_database(url: str) -> bool:
    """Create the PostgreSQL database that ``url`` names when it does not exist (through the
    server's ``postgres`` database, with the same login); True when it was created. SQLite files
    are created by the first connection, so this is a no-op there."""
    u = parse_url(url)
    if u.get_backend_name() != "postgresql" or not u.database:
        return False
    from sqlalchemy import text

    admin = make_engine(u.set(database="postgres").render_as_string(hide_password=False), poolclass=_null_pool(),
                        isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            if conn.execute(text("SELECT 1 FROM pg_database WHERE datname = :n"), {"n": u.database}).first():
                return False
            quoted = conn.dialect.identifier_preparer.quote(u.database)
            conn.exec_driver_sql(f"CREATE DATABASE {quoted}")
            return True
    except SQLAlchemyError as e:
        raise StoreError(f"store {display_url(url)}: cannot create database {u.database!r}: {_one_line(e)}") from e
    finally:
        admin.dispose()

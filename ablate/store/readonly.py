"""Read access to the results store: ``ablate query``, ``results``, ``report`` and ``status``.

Reads are held to reading by the database's own privileges, not by a list of
forbidden words:

- PostgreSQL: a reader role (``ablate_reader``) that may SELECT the store's
  tables and views and nothing else (``grant_reader``, run by ``ablate db
  upgrade`` when the connected user may create roles; ``reader_grant_sql`` is
  the SQL for a DBA). A read command either logs in with a reader URL
  (``--reader-url`` / ``$ABLATE_READER_URL``) or enters the role with ``SET
  ROLE`` on the store's login. ``ablate query`` runs a user's SQL, and a
  statement can leave a role entered with SET ROLE (``set_config('role',
  'none', true)``) and go back to the login's rights; so when the store's
  login could then read server files (a superuser, or a member of
  pg_read_server_files / pg_execute_server_program) a query logs in as the
  reader role itself (the store URL with the user ``ablate_reader`` and no
  password) and is refused, with what to do, when it cannot. Every
  transaction is READ ONLY and has a ``statement_timeout``: the server cancels
  a runaway statement even when the client is gone.
- SQLite: ``PRAGMA query_only``, an authorizer that allows only reads of the
  store's tables and views (and a few introspection pragmas), and a progress
  handler that interrupts a statement after the timeout.

``check_select`` classifies the statement of ``ablate query`` with sqlglot (one
SELECT, nothing that writes or locks) so a mistake gets a clear one-line
reason; it is not what makes the query read-only.
"""

from __future__ import annotations

import math
import os
import sqlite3
import time
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sqlalchemy import Connection, Engine, event, inspect
from sqlalchemy.engine import URL
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.pool import NullPool

from .db import VERSION_TABLE, StoreError, _one_line, _sqlite_file, display_url, make_engine, parse_url, schema_status

if TYPE_CHECKING:
    from .store import Store

DEFAULT_TIMEOUT_S = 30.0
READER_ROLE = "ablate_reader"
READER_URL_ENV = "ABLATE_READER_URL"
_PROGRESS_STEPS = 1000  # SQLite VM instructions between two looks at the clock
_SQLITE_SYSTEM_TABLES = frozenset({"sqlite_master", "sqlite_schema"})  # what introspection reads
_SQLITE_PRAGMAS = frozenset({"table_info", "table_xinfo", "index_list", "index_info", "index_xinfo",
                             "foreign_key_list"})  # introspection pragmas that only read (SQLAlchemy, Alembic)
_SQLITE_ACTIONS = {getattr(sqlite3, n): n[len("SQLITE_"):].replace("_", " ") for n in (
    "SQLITE_CREATE_INDEX", "SQLITE_CREATE_TABLE", "SQLITE_CREATE_TEMP_INDEX", "SQLITE_CREATE_TEMP_TABLE",
    "SQLITE_CREATE_TEMP_TRIGGER", "SQLITE_CREATE_TEMP_VIEW", "SQLITE_CREATE_TRIGGER", "SQLITE_CREATE_VIEW",
    "SQLITE_DELETE", "SQLITE_DROP_INDEX", "SQLITE_DROP_TABLE", "SQLITE_DROP_TEMP_INDEX", "SQLITE_DROP_TEMP_TABLE",
    "SQLITE_DROP_TEMP_TRIGGER", "SQLITE_DROP_TEMP_VIEW", "SQLITE_DROP_TRIGGER", "SQLITE_DROP_VIEW",
    "SQLITE_INSERT", "SQLITE_PRAGMA", "SQLITE_READ", "SQLITE_SELECT", "SQLITE_TRANSACTION", "SQLITE_UPDATE",
    "SQLITE_ATTACH", "SQLITE_DETACH", "SQLITE_ALTER_TABLE", "SQLITE_REINDEX", "SQLITE_ANALYZE",
    "SQLITE_CREATE_VTABLE", "SQLITE_DROP_VTABLE", "SQLITE_FUNCTION", "SQLITE_SAVEPOINT", "SQLITE_RECURSIVE")}
_PG_SERVER_FILE_ROLES = ("pg_read_server_files", "pg_execute_server_program")


# sqlglot nodes that write, wherever they sit in the tree (a data-modifying CTE too)
_WRITE_NODES = ("Insert", "Update", "Delete", "Merge", "Create", "Drop", "Alter", "Command", "Pragma", "Attach",
                "Detach", "TruncateTable", "Copy", "Grant", "Revoke", "Set", "Use", "Transaction", "Commit",
                "Rollback")


class QueryRefused(ValueError):
    """Why a query is not a single read-only SELECT (one line)."""


# --- the statement check -------------------------------------------------------------------------

def check_select(sql: str, dialect: str = "sqlite") -> str:
    """Return ``sql`` cut after its last token (trailing semicolons and comments dropped) if sqlglot
    reads it as one SELECT (or WITH ... SELECT, UNION, VALUES) that neither writes nor locks.

    Raises QueryRefused (a one-line reason) for an empty text, several statements, another kind
    of statement, a data-modifying CTE, SELECT ... INTO, FOR UPDATE / SHARE, or a text sqlglot
    cannot parse. This names a mistake early; the database's privileges are the guard.
    """
    import sqlglot
    from sqlglot import exp
    from sqlglot.errors import ParseError, TokenError
    from sqlglot.tokens import TokenType

    read = "postgres" if dialect == "postgresql" else "sqlite"
    try:
        tokens = [t for t in sqlglot.tokenize(sql, read=read) if t.token_type != TokenType.SEMICOLON]
        trees = [t for t in sqlglot.parse(sql, read=read)
                 if t is not None and not isinstance(t, exp.Semicolon)] if tokens else []
    except (ParseError, TokenError) as e:
        raise QueryRefused(f"cannot read it as one SELECT ({_one_line(e)})") from None
    if not trees:
        raise QueryRefused("empty query")
    if len(trees) > 1:
        raise QueryRefused("only one statement per query")
    tree = trees[0]
    if not isinstance(tree, (exp.Query, exp.Values)):
        kind = tree.key.upper() if not isinstance(tree, exp.Command) else str(tree.this).upper()
        raise QueryRefused(f"only SELECT (or WITH ... SELECT) queries are allowed, not {kind}")
    writes = tuple(getattr(exp, n) for n in _WRITE_NODES if hasattr(exp, n))
    bad = next(tree.find_all(*writes), None)
    if bad is not None:
        raise QueryRefused(f"read-only: {bad.key.upper()} is not allowed in a query")
    if tree.find(exp.Into) is not None or tree.args.get("into") is not None:
        raise QueryRefused("read-only: SELECT ... INTO creates a table")
    if tree.find(exp.Lock) is not None:
        raise QueryRefused("read-only: FOR UPDATE / FOR SHARE locks rows")
    return sql[: tokens[-1].end + 1]


# --- PostgreSQL: the reader role -----------------------------------------------------------------

def _store_objects(connection: Connection) -> list[str]:
    """The store's tables (the models' and the revision table) and views present in the current schema."""
    from .models import Base
    from .views import VIEW_NAMES

    insp = inspect(connection)
    present = set(insp.get_table_names()) | set(insp.get_view_names())
    wanted = [*(t.name for t in Base.metadata.sorted_tables), VERSION_TABLE, *VIEW_NAMES]
    return [n for n in dict.fromkeys(wanted) if n in present]


def reader_grant_sql(objects: list[str], schema: str = "public", role: str = READER_ROLE) -> list[str]:
    """The statements that let ``role`` read ``objects`` of ``schema`` and nothing else."""
    q = _quote
    return [f"GRANT USAGE ON SCHEMA {q(schema)} TO {q(role)}",
            f"GRANT SELECT ON {', '.join(q(schema) + '.' + q(o) for o in objects)} TO {q(role)}"]


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def grant_reader(connection: Connection, role: str = READER_ROLE) -> bool:
    """Create the reader role when missing and the user may, and grant it SELECT on the store.

    PostgreSQL only (False elsewhere). The role may log in (it has no password: with password
    authentication nobody can log in as it until a DBA sets one) and is a member of nothing.
    Idempotent; run after every upgrade, since a migration that recreates a view drops its grants.
    Returns whether the grants were made (False when the role is missing and cannot be created).
    """
    if connection.dialect.name != "postgresql":
        return False
    me = connection.exec_driver_sql(
        "SELECT rolsuper, rolcreaterole FROM pg_roles WHERE rolname = current_user").one()
    exists = connection.exec_driver_sql("SELECT 1 FROM pg_roles WHERE rolname = %(r)s", {"r": role}).first()
    created = exists is None
    if created:
        if not (me.rolsuper or me.rolcreaterole):
            return False
        # two stores of one cluster may be created at once: the second CREATE ROLE loses the race
        connection.exec_driver_sql(
            f"DO $$ BEGIN CREATE ROLE {_quote(role)} LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOINHERIT; "
            "EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL; END $$")
    schema = connection.exec_driver_sql("SELECT current_schema()").scalar()
    objects = _store_objects(connection)
    if not objects:
        return False
    for stmt in reader_grant_sql(objects, schema, role):
        connection.exec_driver_sql(stmt)
    member = connection.exec_driver_sql("SELECT pg_has_role(current_user, %(r)s, 'MEMBER')", {"r": role}).scalar()
    if created and not (me.rolsuper or member):
        connection.exec_driver_sql(f"GRANT {_quote(role)} TO CURRENT_USER")  # so the login may SET ROLE
    return True


# --- reader engines ------------------------------------------------------------------------------

@dataclass
class _Reader:
    """How a reader engine reads: its timeout and, on SQLite, the guard of each connection."""

    url: str
    timeout: float
    dialect: str


_READERS: "weakref.WeakKeyDictionary[Engine, _Reader]" = weakref.WeakKeyDictionary()


def timeout_message(timeout: float) -> str:
    return f"query exceeded --timeout {timeout:g} s"


class _SqliteGuard:
    """The authorizer and progress handler of one SQLite reader connection."""

    def __init__(self, timeout: float) -> None:
        from .models import Base
        from .views import VIEW_NAMES

        self.timeout = timeout
        self.tables = frozenset({*(t.name for t in Base.metadata.sorted_tables), VERSION_TABLE, *VIEW_NAMES,
                                 *_SQLITE_SYSTEM_TABLES})
        self.deadline = math.inf
        self.denied: str | None = None
        self.timed_out = False

    def start(self) -> None:
        """A new statement: its clock starts now."""
        self.deadline = time.monotonic() + self.timeout
        self.denied, self.timed_out = None, False

    def authorize(self, action: int, arg1: str | None, arg2: str | None, db: str | None, _src: str | None) -> int:
        if action in (sqlite3.SQLITE_SELECT, sqlite3.SQLITE_FUNCTION, sqlite3.SQLITE_RECURSIVE,
                      sqlite3.SQLITE_TRANSACTION):
            return sqlite3.SQLITE_OK
        if action == sqlite3.SQLITE_READ and (db == "main" and arg1 in self.tables or db is None and not arg2):
            return sqlite3.SQLITE_OK  # a store's column, or no column at all (count(*), a CTE's rows)
        if action == sqlite3.SQLITE_PRAGMA and (arg1 or "").lower() in _SQLITE_PRAGMAS:
            return sqlite3.SQLITE_OK
        if self.denied is not None:
            return sqlite3.SQLITE_DENY  # the first refusal names the statement
        what = _SQLITE_ACTIONS.get(action, str(action)).lower()
        if action in (sqlite3.SQLITE_INSERT, sqlite3.SQLITE_UPDATE, sqlite3.SQLITE_DELETE) and \
                arg1 in _SQLITE_SYSTEM_TABLES:  # CREATE, DROP, ALTER write the catalog before SQLite names them
            self.denied = {"insert": "create", "delete": "drop", "update": "alter"}[what] + " (a schema change)"
        elif action in (sqlite3.SQLITE_INSERT, sqlite3.SQLITE_UPDATE, sqlite3.SQLITE_DELETE):
            self.denied = f"write ({what}) to table {arg1}"
        elif action == sqlite3.SQLITE_READ:
            self.denied = f"read of {arg1} (only the store's tables and views)"
        elif action == sqlite3.SQLITE_PRAGMA:
            self.denied = f"pragma {arg1}" + ("" if arg2 is None else f" = {arg2}")
        else:
            self.denied = what + ("" if arg1 is None else f" {arg1}")
        return sqlite3.SQLITE_DENY

    def progress(self) -> int:
        if time.monotonic() > self.deadline:
            self.timed_out = True
            return 1  # interrupt: sqlite3.OperationalError("interrupted")
        return 0


def _sqlite_reader(url: str, timeout: float) -> Engine:
    engine = make_engine(url, poolclass=NullPool)  # a fresh connection each time: the guards die with it

    @event.listens_for(engine, "connect")
    def _guard(dbapi_connection: Any, record: Any) -> None:
        dbapi_connection.execute("PRAGMA query_only = ON")
        guard = _SqliteGuard(timeout)
        dbapi_connection.set_authorizer(guard.authorize)
        dbapi_connection.set_progress_handler(guard.progress, _PROGRESS_STEPS)
        record.info["ablate_guard"] = guard

    @event.listens_for(engine, "before_cursor_execute")
    def _start(conn: Connection, *_args: Any) -> None:
        conn.info["ablate_guard"].start()

    @event.listens_for(engine, "handle_error")
    def _explain(ctx: Any) -> None:
        guard = ctx.connection.info.get("ablate_guard") if ctx.connection is not None else None
        reason = _sqlite_reason(guard, ctx.original_exception)
        if reason is not None:
            raise StoreError(reason) from None

    return engine


def _sqlite_reason(guard: _SqliteGuard | None, e: BaseException) -> str | None:
    """The one-line reason of a SQLite error that the guard caused, else None."""
    if guard is None:
        return None
    if guard.timed_out and isinstance(e, sqlite3.OperationalError):
        return timeout_message(guard.timeout)
    if guard.denied is not None and isinstance(e, sqlite3.DatabaseError):
        return f"not allowed: {guard.denied}"
    return None


def _pg_reader(url: str | URL, timeout: float, role: str | None) -> Engine:
    """Every transaction READ ONLY with a statement timeout, as ``role`` when given (SET ROLE)."""
    engine = make_engine(url if isinstance(url, str) else url.render_as_string(hide_password=False),
                         poolclass=NullPool, pool_pre_ping=False)
    ms = max(1, round(timeout * 1000))

    @event.listens_for(engine, "connect")
    def _settings(dbapi_connection: Any, _record: Any) -> None:
        with dbapi_connection.cursor() as cur:
            cur.execute("SET default_transaction_read_only = on")
            cur.execute(f"SET statement_timeout = {ms}")
            if role is not None:
                cur.execute(f"SET ROLE {_quote(role)}")
        dbapi_connection.commit()

    @event.listens_for(engine, "handle_error")
    def _explain(ctx: Any) -> None:
        if _pg_code(ctx.original_exception) == "57014" and "statement timeout" in str(ctx.original_exception):
            raise StoreError(timeout_message(timeout)) from None

    return engine


def _pg_code(e: BaseException) -> str | None:
    return getattr(getattr(e, "diag", None), "sqlstate", None) or getattr(e, "sqlstate", None)


def _can_read_server_files(engine: Engine) -> bool:
    """Whether the login of ``engine``, once out of any role it SET, may read server files."""
    with engine.connect() as conn:
        return bool(conn.exec_driver_sql(
            "SELECT rolsuper OR " + " OR ".join(f"pg_has_role(session_user, '{r}', 'MEMBER')"
                                                for r in _PG_SERVER_FILE_ROLES)
            + " FROM pg_roles WHERE rolname = session_user").scalar())


def reader_engine(url: str, *, timeout: float = DEFAULT_TIMEOUT_S, reader_url: str | None = None,
                  user_sql: bool = False) -> Engine:
    """An engine that can only read the store at ``url``, each statement cut off after ``timeout`` s.

    ``reader_url`` (PostgreSQL; default ``$ABLATE_READER_URL``) logs in as a read-only role.
    Without it the store's login enters ``ablate_reader`` with SET ROLE, except for ``user_sql``
    (``ablate query``) on a login that could leave the role and read server files: then the
    reader role logs in itself (see the module's docstring). Raises StoreError (one line).
    """
    if not timeout > 0 or not math.isfinite(timeout):
        raise StoreError(f"--timeout: {timeout:g} is not a positive number of seconds")
    u = parse_url(url)
    if u.get_backend_name() == "sqlite":
        if _sqlite_file(u) is None:
            raise StoreError(f"store {display_url(url)}: an in-memory store cannot be opened a second time "
                             "for reading; use a SQLite file")
        engine = _sqlite_reader(url, timeout)
    else:
        engine = _pg_login(url, u, timeout, reader_url or os.environ.get(READER_URL_ENV) or None, user_sql)
    _READERS[engine] = _Reader(url, timeout, engine.dialect.name)
    return engine


def _pg_login(url: str, u: URL, timeout: float, reader_url: str | None, user_sql: bool) -> Engine:
    shown = display_url(url)
    if reader_url is not None:
        parse_url(reader_url)
        return _connected(_pg_reader(reader_url, timeout, None), f"--reader-url {display_url(reader_url)}")
    if user_sql:
        login = make_engine(url, poolclass=NullPool)
        try:
            risky = _can_read_server_files(login)
        except SQLAlchemyError as e:
            raise StoreError(f"cannot open store {shown}: {_one_line(e)}") from None
        finally:
            login.dispose()
        if risky:
            as_reader = u.set(username=READER_ROLE, password=None)
            return _connected(_pg_reader(as_reader, timeout, None), f"{display_url(as_reader)}", fix=(
                f"the store's login may read server files, so a query logs in as the role {READER_ROLE} "
                f"instead; give --reader-url (or ${READER_URL_ENV}) with a login that may only read "
                "(dashboards/README.md)"))
    return _connected(_pg_reader(u, timeout, READER_ROLE), shown, fix=(
        f"the login needs the role {READER_ROLE}: run `ablate db upgrade --store {shown}` as a user who "
        "may create roles, or have a DBA run the SQL in dashboards/README.md"))


def _connected(engine: Engine, shown: str, fix: str | None = None) -> Engine:
    """``engine`` once a first connection works; else StoreError naming ``shown`` and ``fix``."""
    try:
        with engine.connect():
            pass
    except SQLAlchemyError as e:
        engine.dispose()
        msg = _one_line(e)
        if "database" in msg and "does not exist" in msg:  # not a role problem: the store is not there
            fix = f"create it with `ablate db upgrade --store {shown}`"
        raise StoreError(f"cannot read store as {shown}: {msg}" + (f"; {fix}" if fix else "")) from None
    return engine


def open_reader(url: str, *, timeout: float = DEFAULT_TIMEOUT_S, reader_url: str | None = None,
                user_sql: bool = False) -> "Store":
    """A ``Store`` over ``reader_engine``: for the read commands. The schema must be current."""
    from .store import Store

    engine = reader_engine(url, timeout=timeout, reader_url=reader_url, user_sql=user_sql)
    try:
        with engine.connect() as conn:
            status = schema_status(conn, url)
    except StoreError:
        engine.dispose()
        raise
    except SQLAlchemyError as e:
        engine.dispose()
        raise StoreError(f"cannot open store {display_url(url)}: {_one_line(e)}") from None
    if status.state != "current":
        engine.dispose()
        raise StoreError(status.message or f"store {display_url(url)}: unusable schema")
    return Store(url, engine)


# --- ablate query --------------------------------------------------------------------------------

def run_query(store: "Store", sql: str, *, timeout: float = DEFAULT_TIMEOUT_S) -> tuple[list[str], list[tuple[Any, ...]]]:
    """Run one read-only SELECT on ``store``; return its column names and rows.

    A store opened by ``open_reader(..., user_sql=True)`` reads through its own engine; any other
    store through a reader engine opened for this call (with ``timeout``). Every error is a
    one-line StoreError: "query refused: ..." (not one SELECT, or the database refused a write or
    a privilege), "query exceeded --timeout N s", or "query failed: ..." (the database's error).
    """
    reader = _READERS.get(store.engine)
    engine = store.engine if reader is not None else reader_engine(store.url, timeout=timeout, user_sql=True)
    reader = _READERS[engine]
    try:
        statement = check_select(sql, reader.dialect)
    except QueryRefused as e:
        raise StoreError(f"query refused: {e}") from None
    try:
        with engine.connect() as conn:
            try:
                return _execute(conn, statement, reader)
            finally:
                conn.rollback()
    finally:
        if engine is not store.engine:
            engine.dispose()


def _execute(conn: Connection, statement: str, reader: _Reader) -> tuple[list[str], list[tuple[Any, ...]]]:
    dbapi = conn.connection.dbapi_connection
    guard = conn.info.get("ablate_guard")
    before = _pg_settings(dbapi) if reader.dialect == "postgresql" else None
    cursor = dbapi.cursor()  # type: ignore[union-attr]
    try:
        if guard is not None:
            guard.start()
        cursor.execute(statement)  # no parameters: the driver parses no placeholders
        if cursor.description is None:
            raise StoreError("query refused: it returns no rows")
        columns = [d[0] for d in cursor.description]
        rows = [tuple(r) for r in cursor.fetchall()]
    except StoreError:
        raise
    except Exception as e:
        raise StoreError(_query_error(e, guard, reader)) from None
    finally:
        cursor.close()
    if before is not None:
        changed = sorted(k for k, v in _pg_settings(dbapi).items() if before.get(k) != v)
        if changed:  # rolled back anyway; a query is not the place to change settings
            raise StoreError(f"query refused: it changes the setting {', '.join(changed)}")
    return columns, rows


def _pg_settings(dbapi: Any) -> dict[str, str]:
    with dbapi.cursor() as cur:
        cur.execute("SELECT name, setting FROM pg_settings")
        return dict(cur.fetchall())


def _query_error(e: Exception, guard: _SqliteGuard | None, reader: _Reader) -> str:
    if reader.dialect == "sqlite":
        reason = _sqlite_reason(guard, e)
        if reason is not None:
            return reason if reason.startswith("query exceeded") else f"query refused: {reason}"
        return f"query failed: {_one_line(e)}"
    code = _pg_code(e)
    if code == "57014" and "statement timeout" in str(e):
        return timeout_message(reader.timeout)
    if code in ("42501", "25006"):  # insufficient_privilege, read_only_sql_transaction
        return f"query refused: {_one_line(e)}"
    return f"query failed: {_one_line(e)}"



"""The statement check of ``Store.query``: one SELECT (or WITH ... SELECT), nothing that writes.

This is the first of two guards; the second is the read-only connection the
query runs on (``PRAGMA query_only`` on SQLite, a ``READ ONLY`` transaction
that is rolled back on PostgreSQL), which stops whatever this check misses.
"""

from __future__ import annotations

import re

# Once the statement is known to be a single SELECT or WITH, these words can only
# make it write: a data-modifying CTE (PostgreSQL: WITH d AS (DELETE ... RETURNING)),
# SELECT ... INTO (creates a table), SELECT ... FOR UPDATE, and a few statement
# keywords that have no business in a query at all.
_FORBIDDEN_WORDS = frozenset("""
    insert update delete merge upsert into drop alter create truncate attach detach pragma vacuum
    reindex grant revoke copy lock call execute notify listen load
""".split())
# Functions with side effects that a SELECT can call (PostgreSQL, SQLite extensions).
_FORBIDDEN_FUNCTIONS = frozenset("""
    set_config pg_terminate_backend pg_cancel_backend pg_reload_conf pg_rotate_logfile pg_promote
    pg_switch_wal pg_create_restore_point pg_logical_emit_message pg_notify lo_import lo_export
    lo_unlink lo_create lo_creat lo_from_bytea lo_put lo_truncate pg_read_file pg_read_binary_file
    pg_ls_dir pg_stat_file pg_file_write dblink dblink_exec nextval setval pg_advisory_lock
    pg_advisory_xact_lock pg_advisory_lock_shared pg_try_advisory_lock pg_sleep pg_sleep_for
    pg_sleep_until query_to_xml query_to_xml_and_xmlschema cursor_to_xml table_to_xml
    load_extension writefile edit
""".split())
_WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_$]*")
_DOLLAR_TAG = re.compile(r"\$([A-Za-z_][A-Za-z0-9_]*)?\$")


class QueryRefused(ValueError):
    """Why a query is not a single read-only SELECT (one line)."""


def _is_word_char(ch: str) -> bool:
    return ch.isalnum() or ch == "_"


def blank(sql: str, dialect: str = "sqlite") -> str:
    """``sql`` with comments and the insides of quoted strings and identifiers blanked.

    The result has the same length as ``sql`` (positions line up): comments become
    spaces, a string literal ``'...'`` becomes ``'   '``, a quoted identifier
    (``"..."``; on SQLite also ```...``` and ``[...]``) becomes underscores.
    PostgreSQL's ``E'...'`` (backslash escapes) and ``$tag$...$tag$`` strings are
    recognised on PostgreSQL only.
    """
    pg = dialect == "postgresql"
    idquotes = "\"" if pg else "\"`["
    out: list[str] = []
    i, n = 0, len(sql)
    while i < n:
        c = sql[i]
        nxt = sql[i + 1] if i + 1 < n else ""
        start = i
        if c == "-" and nxt == "-":
            j = sql.find("\n", i)
            i = n if j < 0 else j
            out.append(" " * (i - start))
        elif c == "/" and nxt == "*":  # PostgreSQL nests block comments
            depth, i = 1, i + 2
            while i < n and depth:
                if sql.startswith("/*", i):
                    depth, i = depth + 1, i + 2
                elif sql.startswith("*/", i):
                    depth, i = depth - 1, i + 2
                else:
                    i += 1
            if depth:
                raise QueryRefused("unterminated /* comment")
            out.append(" " * (i - start))
        elif c == "'":
            # E'...' (PostgreSQL) honours backslash escapes
            backslash = pg and i > 0 and sql[i - 1] in "eE" and (i < 2 or not _is_word_char(sql[i - 2]))
            i += 1
            while True:
                if i >= n:
                    raise QueryRefused("unterminated string literal")
                if backslash and sql[i] == "\\":
                    i += 2
                elif sql[i] == "'":
                    if sql.startswith("''", i):
                        i += 2
                    else:
                        i += 1
                        break
                else:
                    i += 1
            i = min(i, n)
            out.append("'" + " " * (i - start - 2) + "'")
        elif c in idquotes:
            close = {"\"": "\"", "`": "`", "[": "]"}[c]
            i += 1
            while True:
                if i >= n:
                    raise QueryRefused("unterminated quoted identifier")
                if sql[i] == close:
                    if close != "]" and sql.startswith(close * 2, i):
                        i += 2
                        continue
                    i += 1
                    break
                i += 1
            out.append("_" * (i - start))
        elif pg and c == "$" and not (i > 0 and _is_word_char(sql[i - 1])) and (m := _DOLLAR_TAG.match(sql, i)):
            tag = m.group(0)
            j = sql.find(tag, m.end())
            if j < 0:
                raise QueryRefused("unterminated dollar-quoted string")
            i = j + len(tag)
            out.append("'" + " " * (i - start - 2) + "'")
        else:
            out.append(c)
            i += 1
    return "".join(out)


def check_select(sql: str, dialect: str = "sqlite") -> str:
    """Return ``sql`` cut before its trailing semicolon if it is one read-only SELECT.

    Raises QueryRefused (a one-line reason) for anything else: several
    statements, a statement that is not SELECT / WITH, a data-modifying word
    (INSERT, UPDATE, DELETE, MERGE, INTO, DROP, ATTACH, PRAGMA, ...) or a
    function with side effects anywhere outside quotes and comments.
    """
    code = blank(sql, dialect)
    first, sep, rest = code.partition(";")
    if rest.replace(";", "").strip():
        raise QueryRefused("only one statement per query")
    words = [w.lower() for w in _WORD.findall(first)]
    if not words:
        raise QueryRefused("empty query")
    if words[0] not in ("select", "with"):
        raise QueryRefused(f"only SELECT (or WITH ... SELECT) queries are allowed, not {words[0].upper()}")
    bad = next((w for w in words if w in _FORBIDDEN_WORDS), None)
    if bad:
        raise QueryRefused(f"read-only: {bad.upper()} is not allowed in a query")
    bad = next((w for w in words if w in _FORBIDDEN_FUNCTIONS), None)
    if bad:
        raise QueryRefused(f"read-only: the function {bad}() is not allowed in a query")
    return sql[: len(first)].rstrip() if sep else sql.rstrip()

#!/usr/bin/env bash
# An MLflow tracking server on one machine: PostgreSQL backend store (database created if
# missing), artifacts proxied by the server (clients need no shared disk), bound to 127.0.0.1,
# one web worker, MLflow 3's job runner off, in its own session; stopped by the recorded
# session id. See infra/local/README.md.
set -euo pipefail

PROG=mlflow.sh
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
# Ports and names from infra/defaults.env, and the functions both scripts share.
# shellcheck source-path=SCRIPTDIR source=common.sh
. "$REPO/infra/local/common.sh"
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION

# The server and its web workers carry ABLATE_MLFLOW_SERVER=<DIR/mlflow> (see ours()).
MARKER=ABLATE_MLFLOW_SERVER MARKER_OF=ML_DIR
DROP_DB=0  # down --drop-db

usage() {
    cat <<EOF
usage: $PROG up [--port P] [--pg-url URL] [--db NAME] [--artifacts DIR] [--timeout S]
                  [--state-dir DIR]
       $PROG down [--drop-db] [--state-dir DIR]
       $PROG status [--state-dir DIR]

up      create database NAME on the PostgreSQL server URL if missing, start 'mlflow server'
        on 127.0.0.1:P with artifacts proxied to DIR, wait for GET /health; print on stdout
        only:  export MLFLOW_TRACKING_URI=http://127.0.0.1:P
down    stop the recorded server session (TERM, 15 s, KILL), check the port is closed;
        --drop-db also drops its database
status  pid, URI, database and /health; exit 0 when up and healthy, 1 when running but
        not healthy, 3 when down

defaults: --port $ABLATE_MLFLOW_PORT --pg-url $ABLATE_PG_URL --db $ABLATE_MLFLOW_DB
          --artifacts DIR/mlflow/artifacts --timeout 120
          --state-dir \${ABLATE_INFRA_DIR:-$REPO/.ablate-infra}
mlflow from \${ABLATE_VENV_BIN:-$REPO/.venv/bin}. State: DIR/mlflow/server.env, server.pid, server.log.
EOF
}

load_state() {  # read DIR/mlflow/server.env (key=value lines written by up)
    ML_DIR=$STATE/mlflow
    SERVER_ENV=$ML_DIR/server.env
    read_env "$SERVER_ENV" pid=S_PID port=S_PORT db=S_DB pg_url=S_PG_URL
}

health() { curl -fsS --max-time 5 "http://127.0.0.1:$1/health" >/dev/null 2>&1; }

pg() {  # pg create|drop|exists PG_URL DB: database admin through the venv's psycopg
    "$BIN/python" - "$@" <<'EOF'
import sys
from urllib.parse import urlsplit, urlunsplit
action, url, db = sys.argv[1:]
parts = urlsplit(url)
if not parts.scheme.startswith("postgresql") or parts.path not in ("", "/"):
    sys.exit(f"--pg-url must be a server URL such as postgresql+psycopg://user@host:5432, got {url!r}")
import psycopg
from psycopg import sql
admin = urlunsplit(("postgresql", parts.netloc, "/postgres", parts.query, ""))
try:
    with psycopg.connect(admin, autocommit=True, connect_timeout=10) as conn:
        exists = conn.execute("select 1 from pg_database where datname = %s", (db,)).fetchone()
        if action == "create" and not exists:
            conn.execute(sql.SQL("create database {}").format(sql.Identifier(db)))
            print("created")
        elif action == "drop" and exists:
            conn.execute(sql.SQL("drop database {} with (force)").format(sql.Identifier(db)))
            print("dropped")
        elif action == "exists":
            sys.exit(0 if exists else 1)
except psycopg.Error as e:
    sys.exit(f"PostgreSQL at {parts.hostname}:{parts.port or 5432}: {str(e).strip().splitlines()[0]}")
EOF
}

cleanup_failed_up() {
    local rc=$?
    trap - EXIT
    if [[ -n ${STARTED_PID:-} ]]; then (stop_sessions "$STARTED_PID") || true; fi
    rm -f "$SERVER_ENV" "$ML_DIR/server.pid"
    exit "$rc"
}

cmd_up() {
    local port=$ABLATE_MLFLOW_PORT pg_url=$ABLATE_PG_URL db=$ABLATE_MLFLOW_DB artifacts='' timeout=120
    while (($#)); do
        case $1 in
            --port | --pg-url | --db | --artifacts | --timeout | --state-dir)
                (($# >= 2)) || die 2 "$1 needs a value"
                case $1 in
                    --port) int_opt "$1" "$2" 1024 && port=$((10#$2)) ;;
                    --pg-url) pg_url=${2%/} ;;
                    --db) db=$2 ;;
                    --artifacts) artifacts=$2 ;;
                    --timeout) int_opt "$1" "$2" 1 && timeout=$((10#$2)) ;;
                    --state-dir) STATE=$2 ;;
                esac
                shift 2
                ;;
            -h | --help) usage && exit 0 ;;
            *) die 2 "unknown option for up: '$1' (see --help)" ;;
        esac
    done
    ((port <= 65535)) || die 2 "--port must be at most 65535, got $port"
    [[ $db =~ ^[A-Za-z_][A-Za-z0-9_]{0,62}$ ]] || die 2 "--db expects a plain identifier ([A-Za-z_][A-Za-z0-9_]*), got '$db'"
    [[ -x $BIN/mlflow && -x $BIN/python ]] || die 1 "no mlflow in $BIN (run 'make install' or set ABLATE_VENV_BIN)"

    load_state || true
    mkdir -p "$ML_DIR"
    lock_state "$ML_DIR" -n
    if [[ -n $S_PID ]]; then
        if [[ -n $(session_pids "$S_PID") ]]; then
            die 1 "an MLflow server is already running from $STATE (MLFLOW_TRACKING_URI=http://127.0.0.1:$S_PORT); run '$PROG down' first"
        fi
        rm -f "$SERVER_ENV" "$ML_DIR/server.pid"
    fi
    ! port_open "$port" || die 1 "port $port is in use; pick another --port"
    artifacts=${artifacts:-$ML_DIR/artifacts}
    mkdir -p "$artifacts"
    artifacts=$(cd "$artifacts" && pwd)

    local t0=$SECONDS created
    created=$(pg create "$pg_url" "$db" 2>&1) || die 1 "${created##*$'\n'}"
    [[ $created == created ]] && say "created database $db"

    say "starting mlflow server on 127.0.0.1:$port (database $db, artifacts $artifacts)"
    STARTED_PID=''
    trap_cleanup
    # Own session (setsid without fork: a background job of a script is not a group leader);
    # the marker lets down recognise exactly these processes; fd 9 (the lock) stays here.
    setsid env ABLATE_MLFLOW_SERVER="$ML_DIR" PATH="$BIN:$PATH" \
        "$BIN/mlflow" server \
        --backend-store-uri "$pg_url/$db" \
        --serve-artifacts --artifacts-destination "$artifacts" \
        --host 127.0.0.1 --port "$port" --workers 1 \
        </dev/null >"$ML_DIR/server.log" 2>&1 9>&- &
    STARTED_PID=$!
    echo "$STARTED_PID" >"$ML_DIR/server.pid"
    printf 'pid=%s\nport=%s\ndb=%s\npg_url=%s\nartifacts=%s\n' \
        "$STARTED_PID" "$port" "$db" "$pg_url" "$artifacts" >"$SERVER_ENV"

    local deadline=$((SECONDS + timeout))
    until health "$port"; do
        if [[ -z $(session_pids "$STARTED_PID") ]]; then
            die 1 "mlflow server exited during start: $(grep -v '^\s*$' "$ML_DIR/server.log" | tail -n 1)"
        fi
        ((SECONDS < deadline)) || die 1 "no answer from http://127.0.0.1:$port/health after $timeout s; log: $ML_DIR/server.log"
        sleep 0.5
    done
    trap - EXIT
    say "up in $((SECONDS - t0)) s (pid $STARTED_PID)"
    echo "export MLFLOW_TRACKING_URI=http://127.0.0.1:$port"
}

state_opt() {  # state_opt OPTION: the flag of down that state_opts leaves to this script
    case $1 in
        --drop-db)
            [[ $CMD == down ]] || die 2 "--drop-db is an option of down"
            DROP_DB=1
            ;;
        *) return 1 ;;
    esac
}

cmd_down() {
    state_opts "$@"
    if ! load_state; then
        say "no MLflow server recorded in $STATE"
        return 0
    fi
    lock_state "$ML_DIR" -w 30
    local t0=$SECONDS i out
    stop_sessions "$S_PID"
    # The server is ours and gone; whatever still listens there is not, so say so.
    for ((i = 0; i < 20; i++)); do port_open "$S_PORT" || break; sleep 0.25; done
    ! port_open "$S_PORT" || die 1 "server stopped but port $S_PORT is still open (another process?)"
    if ((DROP_DB)); then
        out=$(pg drop "$S_PG_URL" "$S_DB" 2>&1) || die 1 "${out##*$'\n'}"
        say "dropped database $S_DB"
    fi
    rm -f "$SERVER_ENV" "$ML_DIR/server.pid"
    say "down in $((SECONDS - t0)) s (session $S_PID stopped, port $S_PORT closed)"
}

cmd_status() {
    state_opts "$@"
    if ! load_state; then
        say "down: no MLflow server recorded in $STATE"
        return 3
    fi
    local proc=dead h=no
    [[ -n $(session_pids "$S_PID") ]] && proc=alive
    health "$S_PORT" && h=ok
    printf 'pid=%s process=%s health=%s uri=http://127.0.0.1:%s db=%s\n' "$S_PID" "$proc" "$h" "$S_PORT" "$S_DB"
    if [[ $proc == alive && $h == ok ]]; then return 0; elif [[ $proc == alive ]]; then return 1; fi
    return 3
}

main "$@"

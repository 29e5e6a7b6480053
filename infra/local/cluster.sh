#!/usr/bin/env bash
# A real multi-node Ray cluster on one machine: a head and N worker nodes, each its own
# `ray start --block` raylet in its own session, with its own ports and temp dir, so it
# lives beside a user's default Ray (6379/8265/10001) and beside another cluster started
# here with a different --port. Stopped by the recorded session ids, never `ray stop`.
# See infra/local/README.md.
set -euo pipefail

PROG=cluster.sh
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
# Ports and names from infra/defaults.env, and the functions both scripts share.
# shellcheck source-path=SCRIPTDIR source=common.sh
. "$REPO/infra/local/common.sh"
# Exported so every process started here, and our own ray/python calls, see it: with it unset
# Ray 2.6x turns token auth on for a head when ~/.ray/auth_token exists (left by any local
# ray.init()), and `ray start --address` then cannot join.
export RAY_AUTH_MODE
export RAY_USAGE_STATS_ENABLED=0

# Every process a node starts carries ABLATE_RAY_CLUSTER=<its temp dir> (see ours()).
MARKER=ABLATE_RAY_CLUSTER MARKER_OF=S_TEMP_DIR

# Port layout relative to the GCS port P. Node i (0 = head, 1..N workers) owns the block
# P+10+i*STRIDE .. +STRIDE-1: node manager, object manager, metrics export, agent http,
# agent grpc, runtime env agent, 4 spare, then WORKER_PORTS worker ports.
STRIDE=110
WORKER_PORTS=100

usage() {
    cat <<EOF
usage: $PROG up [--workers N] [--cpus-per-node C] [--head-cpus H] [--port P]
                   [--dashboard-port D] [--client-port R] [--object-store-mb M]
                   [--timeout S] [--state-dir DIR]
       $PROG down [--state-dir DIR]
       $PROG status [--state-dir DIR]

up      start a head (H CPUs, dashboard + Jobs API on 127.0.0.1:D) and N worker nodes
        (C CPUs each) as separate raylets; wait until all are alive; print on stdout only
        lines to eval:  export RAY_ADDRESS=http://127.0.0.1:D
down    stop exactly the recorded node sessions (TERM, 15 s, KILL) and remove the temp dir
status  one line per node: name, session pid, raylet pid, process state, Ray state, node id;
        exit 0 when all nodes are alive, 1 when some are not, 3 when the cluster is down

defaults: --workers 1 --cpus-per-node 1 --head-cpus 0 --port $ABLATE_RAY_PORT
          --dashboard-port $ABLATE_RAY_DASHBOARD_PORT --client-port $ABLATE_RAY_CLIENT_PORT (P+1 when
          --port is not the default) --object-store-mb 512 --timeout 180
          --state-dir \${ABLATE_INFRA_DIR:-$REPO/.ablate-infra}
ray from \${ABLATE_VENV_BIN:-$REPO/.venv/bin}. Node P uses ports P, P+10 .. P+9+(N+1)*$STRIDE
and temp dir /tmp/ablate-ray-P. State: DIR/ray/nodes.tsv (name, pid, raylet_pid, node_id).
EOF
}

# --- state -----------------------------------------------------------------------------

load_state() {  # read DIR/ray/cluster.env (key=value lines written by up) into shell vars
    RAY_DIR=$STATE/ray
    NODES_TSV=$RAY_DIR/nodes.tsv
    CLUSTER_ENV=$RAY_DIR/cluster.env
    read_env "$CLUSTER_ENV" temp_dir=S_TEMP_DIR dashboard_port=S_DASHBOARD_PORT sids=S_SIDS
}

# --- up --------------------------------------------------------------------------------

free_ports() {  # free_ports PORT...: fail with the first one something listens on
    "$BIN/python" - "$@" <<'EOF'
import socket, sys
for p in sys.argv[1:]:
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers bind; TIME_WAIT is free
    try:
        s.bind(("127.0.0.1", int(p)))
    except OSError:
        print(p)
        sys.exit(1)
    finally:
        s.close()
EOF
}

wait_nodes() {  # wait_nodes DASH TIMEOUT NAME=PID...: poll the state API; print "name node_id"
    "$BIN/python" - "$@" <<'EOF'
import json, os, sys, time, urllib.request
dash, timeout, expected = sys.argv[1], float(sys.argv[2]), dict(a.split("=") for a in sys.argv[3:])
url = f"http://127.0.0.1:{dash}/api/v0/nodes?limit=1000&detail=false"
deadline, alive = time.monotonic() + timeout, {}
while True:
    for name, pid in expected.items():
        try:  # a node whose `ray start` exited will never come: fail now, not at the timeout
            os.kill(int(pid), 0)
        except ProcessLookupError:
            print(f"node {name} (pid {pid}) exited during start", file=sys.stderr)
            print(f"EXITED={name}")
            sys.exit(1)
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            rows = json.load(r)["data"]["result"]["result"]
        alive = {n["node_name"]: n["node_id"] for n in rows if n["state"] == "ALIVE"}
    except (OSError, ValueError, KeyError):
        pass  # dashboard not up yet
    if all(name in alive for name in expected):
        for name in expected:
            print(name, alive[name])
        sys.exit(0)
    if time.monotonic() > deadline:
        missing = sorted(set(expected) - set(alive))
        print(f"timed out after {timeout:.0f} s; not alive: {' '.join(missing)}", file=sys.stderr)
        sys.exit(1)
    time.sleep(0.5)
EOF
}

wait_port() {  # wait_port PORT TIMEOUT PID: until something accepts on 127.0.0.1:PORT
    local deadline=$((SECONDS + $2))
    until port_open "$1"; do
        kill -0 "$3" 2>/dev/null || return 1
        ((SECONDS < deadline)) || return 1
        sleep 0.25
    done
}

raylet_pid() {  # raylet_pid SID: the raylet of a node's session
    ps -s "$1" -o pid=,comm= 2>/dev/null | awk '$2 == "raylet" {print $1; exit}'
}

start_node() {  # start_node NAME INDEX CPUS ARGS...: background `ray start --block` in a new session
    local name=$1 index=$2 cpus=$3 base
    shift 3
    base=$((PORT + 10 + index * STRIDE))
    # setsid without a fork (a background job of a script is not a group leader), so $! is
    # the session leader; fd 9 (the state lock) is closed so the nodes do not hold it.
    # Drain timeout 0: on SIGTERM Ray 2.6x otherwise asks the GCS to drain the node and waits
    # up to 30 s, and the GCS is being stopped at the same moment.
    setsid env -u RAY_ADDRESS \
        PATH="$BIN:$PATH" \
        ABLATE_RAY_CLUSTER="$TEMP_DIR" \
        RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S=0 \
        "$BIN/ray" start --block --disable-usage-stats \
        --node-ip-address 127.0.0.1 \
        --node-name "$name" \
        --temp-dir "$TEMP_DIR/$name" \
        --num-cpus "$cpus" \
        --object-store-memory $((OBJ_MB * 1024 * 1024)) \
        --node-manager-port "$base" \
        --object-manager-port $((base + 1)) \
        --metrics-export-port $((base + 2)) \
        --dashboard-agent-listen-port $((base + 3)) \
        --dashboard-agent-grpc-port $((base + 4)) \
        --runtime-env-agent-port $((base + 5)) \
        --min-worker-port $((base + 10)) \
        --max-worker-port $((base + 10 + WORKER_PORTS - 1)) \
        "$@" </dev/null >"$RAY_DIR/$name.log" 2>&1 9>&- &
    LAST_PID=$!
}

cleanup_failed_up() {  # on any failure of up: stop what it started, leave no state behind
    local rc=$?
    trap - EXIT
    if [[ -n ${STARTED_SIDS:-} ]]; then
        say "cleaning up the nodes started"
        # shellcheck disable=SC2086  # a list of pids
        (stop_sessions $STARTED_SIDS) || true
    fi
    # shellcheck disable=SC2086  # a list of pids
    if [[ -n ${TEMP_DIR:-} && -z $(session_pids ${STARTED_SIDS:-}) ]]; then rm -rf "$TEMP_DIR"; fi
    rm -f "$NODES_TSV" "$CLUSTER_ENV"
    exit "$rc"
}

cmd_up() {
    local workers=1 cpus=1 head_cpus=0 dash=$ABLATE_RAY_DASHBOARD_PORT client='' timeout=180
    PORT=$ABLATE_RAY_PORT OBJ_MB=512
    while (($#)); do
        case $1 in
            --workers | --cpus-per-node | --head-cpus | --port | --dashboard-port | --client-port | \
                --object-store-mb | --timeout | --state-dir)
                (($# >= 2)) || die 2 "$1 needs a value"
                case $1 in
                    --workers) int_opt "$1" "$2" 0 && workers=$((10#$2)) ;;
                    --cpus-per-node) int_opt "$1" "$2" 0 && cpus=$((10#$2)) ;;
                    --head-cpus) int_opt "$1" "$2" 0 && head_cpus=$((10#$2)) ;;
                    --port) int_opt "$1" "$2" 1024 && PORT=$((10#$2)) ;;
                    --dashboard-port) int_opt "$1" "$2" 1024 && dash=$((10#$2)) ;;
                    --client-port) int_opt "$1" "$2" 1024 && client=$((10#$2)) ;;
                    --object-store-mb) int_opt "$1" "$2" 80 && OBJ_MB=$((10#$2)) ;;
                    --timeout) int_opt "$1" "$2" 1 && timeout=$((10#$2)) ;;
                    --state-dir) STATE=$2 ;;
                esac
                shift 2
                ;;
            -h | --help) usage && exit 0 ;;
            *) die 2 "unknown option for up: '$1' (see --help)" ;;
        esac
    done
    if [[ -z $client ]]; then
        if ((PORT == ABLATE_RAY_PORT)); then client=$ABLATE_RAY_CLIENT_PORT; else client=$((PORT + 1)); fi
    fi
    local last=$((PORT + 9 + (workers + 1) * STRIDE))
    ((last <= 65535)) || die 2 "--port $PORT with $workers workers needs ports up to $last (> 65535)"
    local p
    for p in "$dash" "$client"; do
        ((p != PORT && (p < PORT + 10 || p > last))) ||
            die 2 "port $p clashes with the GCS port $PORT or the node ports $((PORT + 10))..$last; pick another --port"
    done
    ((dash != client)) || die 2 "--dashboard-port and --client-port are both $dash"
    ((workers > 0 || head_cpus > 0)) || die 2 "--workers 0 with --head-cpus 0 leaves no CPU to run on"
    [[ -x $BIN/ray && -x $BIN/python ]] || die 1 "no ray in $BIN (run 'make install' or set ABLATE_VENV_BIN)"

    load_state || true
    mkdir -p "$RAY_DIR"
    lock_state "$RAY_DIR" -n
    if [[ -n $S_SIDS ]]; then
        # shellcheck disable=SC2086  # a list of pids
        if [[ -n $(session_pids $S_SIDS) ]]; then
            die 1 "a cluster is already running from $STATE (RAY_ADDRESS=http://127.0.0.1:$S_DASHBOARD_PORT); run '$PROG down' first"
        fi
        say "removing the state of a cluster that is no longer running"
        [[ -n $S_TEMP_DIR ]] && rm -rf "$S_TEMP_DIR"
        rm -f "$NODES_TSV" "$CLUSTER_ENV"
    fi
    local busy ports=("$PORT" "$dash" "$client")
    for ((p = PORT + 10; p <= last; p++)); do ports+=("$p"); done
    busy=$(free_ports "${ports[@]}") || die 1 "port $busy is in use; pick another --port/--dashboard-port/--client-port"

    # Short on purpose: unix socket paths under it must stay below ~100 characters.
    TEMP_DIR=/tmp/ablate-ray-$PORT
    S_TEMP_DIR=$TEMP_DIR  # the marker ours() looks for, should up fail and clean up
    # Ports are free, so no live cluster owns it: what is there is left by a crash.
    rm -rf "$TEMP_DIR"
    mkdir -p "$TEMP_DIR"
    STARTED_SIDS=''
    trap_cleanup
    write_env() {
        printf 'port=%s\ndashboard_port=%s\nclient_port=%s\ntemp_dir=%s\nsids=%s\n' \
            "$PORT" "$dash" "$client" "$TEMP_DIR" "$STARTED_SIDS" >"$CLUSTER_ENV"
    }

    local t0=$SECONDS
    say "starting head (GCS 127.0.0.1:$PORT, dashboard 127.0.0.1:$dash, $head_cpus CPUs)"
    start_node head 0 "$head_cpus" --head --port "$PORT" \
        --include-dashboard true --dashboard-host 127.0.0.1 --dashboard-port "$dash" \
        --ray-client-server-port "$client"
    local head_pid=$LAST_PID
    STARTED_SIDS=$head_pid
    write_env
    # Workers can only join once the GCS answers.
    wait_port "$PORT" "$timeout" "$head_pid" ||
        die 1 "head did not open GCS port $PORT: $(tail -n 1 "$RAY_DIR/head.log")"

    local i names=("head=$head_pid")
    for ((i = 1; i <= workers; i++)); do
        say "starting worker$i ($cpus CPUs)"
        start_node "worker$i" "$i" "$cpus" --address "127.0.0.1:$PORT"
        STARTED_SIDS="$STARTED_SIDS $LAST_PID"
        names+=("worker$i=$LAST_PID")
    done
    write_env

    say "waiting for $((workers + 1)) nodes to be alive (timeout ${timeout} s)"
    local ids err
    err=$(mktemp)
    if ! ids=$(wait_nodes "$dash" $((timeout - (SECONDS - t0))) "${names[@]}" 2>"$err"); then
        local msg
        local msg last=''
        msg=$(tail -n 1 "$err")
        rm -f "$err"
        if [[ $ids == EXITED=* ]]; then  # its own last words say why (e.g. InvalidAuthToken)
            last=$(grep -v '^\s*$' "$RAY_DIR/${ids#EXITED=}.log" | tail -n 1 | cut -c1-200)
            last=${last:+: $last}
        fi
        die 1 "cluster did not come up: ${msg:-state API failed}$last; logs in $RAY_DIR"
    fi
    rm -f "$err"

    local tmp=$NODES_TSV.tmp entry name pid rpid
    printf 'name\tpid\traylet_pid\tnode_id\n' >"$tmp"
    for entry in "${names[@]}"; do
        name=${entry%%=*} pid=${entry#*=}
        rpid=$(raylet_pid "$pid")
        [[ -n $rpid ]] || die 1 "no raylet found in the session of $name (pid $pid)"
        printf '%s\t%s\t%s\t%s\n' "$name" "$pid" "$rpid" "$(awk -v n="$name" '$1 == n {print $2}' <<<"$ids")" >>"$tmp"
    done
    mv "$tmp" "$NODES_TSV"
    trap - EXIT
    say "up in $((SECONDS - t0)) s: $((workers + 1)) nodes; state in $NODES_TSV"
    echo "export RAY_ADDRESS=http://127.0.0.1:$dash"
    echo "export RAY_AUTH_MODE=$RAY_AUTH_MODE"
}

# --- down / status ---------------------------------------------------------------------

cmd_down() {
    state_opts "$@"
    if ! load_state; then
        say "no cluster recorded in $STATE"
        return 0
    fi
    lock_state "$RAY_DIR" -w 30
    local t0=$SECONDS
    # shellcheck disable=SC2086  # a list of pids
    stop_sessions $S_SIDS
    [[ -n $S_TEMP_DIR ]] && rm -rf "$S_TEMP_DIR"
    rm -f "$NODES_TSV" "$CLUSTER_ENV"
    say "down in $((SECONDS - t0)) s (sessions $S_SIDS stopped, $S_TEMP_DIR removed)"
}

cmd_status() {
    state_opts "$@"
    if ! load_state || [[ ! -f $NODES_TSV ]]; then
        say "down: no cluster recorded in $STATE"
        return 3
    fi
    # Ray's own view, when the dashboard answers; "-" otherwise.
    local states
    states=$("$BIN/python" - "$S_DASHBOARD_PORT" <<'EOF' 2>/dev/null || true
import json, sys, urllib.request
url = f"http://127.0.0.1:{sys.argv[1]}/api/v0/nodes?limit=1000&detail=false"
with urllib.request.urlopen(url, timeout=5) as r:
    for n in json.load(r)["data"]["result"]["result"]:
        print(n["node_id"], n["state"])
EOF
    )
    local name pid rpid nid proc ray_state alive=0 total=0
    printf '%-10s %8s %10s %-8s %-8s %s\n' NAME PID RAYLET_PID PROCESS RAY NODE_ID
    while IFS=$'\t' read -r name pid rpid nid; do
        [[ $name == name ]] && continue
        total=$((total + 1))
        proc=dead
        if ours "$pid" && ours "$rpid"; then proc=alive; fi
        ray_state=$(awk -v id="$nid" '$1 == id {print $2}' <<<"$states")
        if [[ $proc == alive && $ray_state == ALIVE ]]; then alive=$((alive + 1)); fi
        printf '%-10s %8s %10s %-8s %-8s %s\n' "$name" "$pid" "$rpid" "$proc" "${ray_state:--}" "$nid"
    done <"$NODES_TSV"
    say "$alive/$total nodes alive; RAY_ADDRESS=http://127.0.0.1:$S_DASHBOARD_PORT"
    # shellcheck disable=SC2086  # a list of pids
    if ((alive == total)); then return 0; elif [[ -n $(session_pids $S_SIDS) ]]; then return 1; fi
    return 3
}

main "$@"

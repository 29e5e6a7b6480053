# shellcheck shell=bash
# What cluster.sh and mlflow.sh share: infra/defaults.env, messages, option checks, the state
# dir and its lock, recognising and stopping the processes they started, and the command
# dispatch. Sourced, never run. The sourcing script sets REPO and PROG before sourcing it; and,
# before it calls anything here, MARKER (the environment variable its processes carry) and
# MARKER_OF (the name of the shell variable holding that marker's value); and it defines usage,
# load_state, cmd_up, cmd_down and cmd_status.

# shellcheck source-path=SCRIPTDIR source=../defaults.env
. "$REPO/infra/defaults.env"
# shellcheck disable=SC2034  # used by the sourcing scripts
BIN=${ABLATE_VENV_BIN:-$REPO/.venv/bin}
STATE=${ABLATE_INFRA_DIR:-$REPO/.ablate-infra}

die() {  # die CODE MESSAGE: one line on stderr, no traceback
    local code=$1
    shift
    printf '%s: %s\n' "$PROG" "$*" >&2
    exit "$code"
}

say() { printf '%s: %s\n' "$PROG" "$*" >&2; }

int_opt() {  # int_opt NAME VALUE MIN: validate a non-negative integer option
    [[ $2 =~ ^[0-9]+$ ]] || die 2 "$1 expects an integer, got '$2'"
    ((10#$2 >= $3)) || die 2 "$1 must be at least $3, got '$2'"
}

port_open() { (: <"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# --- state -----------------------------------------------------------------------------

read_env() {  # read_env FILE KEY=VAR...: VAR := KEY's value in FILE's key=value lines, else ''
    local file=$1 key value pair
    shift
    for pair in "$@"; do printf -v "${pair#*=}" '%s' ''; done
    [[ -f $file ]] || return 1
    while IFS='=' read -r key value; do
        for pair in "$@"; do
            if [[ $key == "${pair%%=*}" ]]; then printf -v "${pair#*=}" '%s' "$value"; fi
        done
    done <"$file"
    return 0
}

state_opts() {  # --state-dir DIR, the option of down and status, and any that state_opt takes
    while (($#)); do
        case $1 in
            --state-dir)
                (($# >= 2)) || die 2 "$1 needs a value"
                STATE=$2
                shift 2
                ;;
            -h | --help) usage && exit 0 ;;
            *)
                # state_opt OPTION, when the script defines it: 0 when it took that flag.
                if declare -F state_opt >/dev/null && state_opt "$1"; then
                    shift
                else
                    die 2 "unknown option for $CMD: '$1' (see --help)"
                fi
                ;;
        esac
    done
}

lock_state() {  # lock_state DIR FLOCK_OPTION...: hold DIR/lock on fd 9 for the rest of the script
    exec 9>"$1/lock"
    shift
    flock "$@" 9 || die 1 "another $PROG is busy with $STATE"
}

# --- our processes ---------------------------------------------------------------------

ours() {  # ours PID: the process exists, is not a zombie, and carries our marker
    local pid=$1 stat
    stat=$(cat "/proc/$pid/stat" 2>/dev/null) || return 1
    stat=${stat##*) }
    [[ ${stat%% *} != Z ]] || return 1
    # The marker is inherited by every process started (a raylet's workers and agents, the
    # server's web workers), so a reused pid or session id of some other program never matches.
    tr '\0' '\n' 2>/dev/null <"/proc/$pid/environ" | grep -qxF "$MARKER=${!MARKER_OF}"
}

session_pids() {  # session_pids SID...: our live processes in those sessions
    local sid pid
    for sid in "$@"; do
        for pid in $(ps -s "$sid" -o pid= 2>/dev/null); do
            if ours "$pid"; then echo "$pid"; fi
        done
    done
}

stop_sessions() {  # stop_sessions SID...: TERM their process groups, wait 15 s, KILL, verify
    local left pgids pid i sig
    left=$(session_pids "$@")
    [[ -n $left ]] || return 0
    for sig in TERM KILL; do
        pgids=$(for pid in $left; do ps -o pgid= -p "$pid" 2>/dev/null; done | sort -u)
        for pid in $pgids; do kill -s "$sig" -- "-$pid" 2>/dev/null || true; done
        for ((i = 0; i < 60; i++)); do
            left=$(session_pids "$@")
            [[ -n $left ]] || return 0
            sleep 0.25
        done
        [[ $sig == KILL ]] || say "still running after SIGTERM + 15 s, sending SIGKILL: $(echo "$left" | tr '\n' ' ')"
    done
    die 1 "processes left after SIGKILL: $(echo "$left" | tr '\n' ' ')"
}

trap_cleanup() {  # from here on, any exit of up (an error, Ctrl-C, kill) runs cleanup_failed_up
    trap cleanup_failed_up EXIT
    # Interrupted: exit through the EXIT trap, which stops what was started.
    trap 'exit 130' INT
    trap 'exit 143' TERM
}

# --- commands --------------------------------------------------------------------------

main() {  # main COMMAND ARGS...: the command line of the sourcing script
    CMD=${1:-}
    [[ -n $CMD ]] || {
        usage >&2
        exit 2
    }
    shift
    case $CMD in
        up) cmd_up "$@" ;;
        down) cmd_down "$@" ;;
        status) cmd_status "$@" ;;
        -h | --help | help) usage ;;
        *) die 2 "unknown command '$CMD' (expected up, down or status; see --help)" ;;
    esac
}

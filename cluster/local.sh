#!/usr/bin/env bash
# A Ray cluster on this machine for DE-CROP studies: a head node, optionally a second node and an MLflow
# tracking server, all bound to 127.0.0.1 where Ray allows it and protected by Ray's token auth. Without
# --with-worker every listener of the head (GCS, raylet, workers, agents, metrics exporters, dashboard) is on
# loopback; a second node rules that out (see cluster/README.md, "Security stance").
#
#   cluster/local.sh up [--with-worker] [--with-mlflow]   start (prints what to export and how to submit)
#   cluster/local.sh status                               what is running, and `ray status`
#   cluster/local.sh env                                  the exports, for: eval "$(cluster/local.sh env)"
#   cluster/local.sh down                                 stop everything this script started
#
# State (Ray temp dirs, logs, mlflow.db, artifacts) lives in $DECROP_CLUSTER_DIR (default <repo>/.cluster,
# git-ignored). Keep that path short: Ray puts unix sockets under it and they are limited to 107 characters.
#
# Why not `ray stop`: it kills every Ray process of every cluster on the machine by name. `down` stops only
# the process groups of the nodes whose temp dir is under $DECROP_CLUSTER_DIR, and their children.
# Why two temp dirs: two nodes sharing one --temp-dir deleted a running job's working directory (Ray 2.60).
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CLUSTER_DIR=${DECROP_CLUSTER_DIR:-$REPO/.cluster}
GCS_PORT=${DECROP_GCS_PORT:-6379}
DASHBOARD_PORT=${DECROP_DASHBOARD_PORT:-8265}
CLIENT_PORT=${DECROP_CLIENT_PORT:-10001}
MLFLOW_PORT=${DECROP_MLFLOW_PORT:-5000}
HEAD_CPUS=${DECROP_HEAD_CPUS:-$(nproc)}
WORKER_CPUS=${DECROP_WORKER_CPUS:-$(nproc)}
HEAD_DIR=$CLUSTER_DIR/ray-head
WORKER_DIR=$CLUSTER_DIR/ray-worker

# Ray and MLflow from the project's virtualenv when there is one. Putting it first on PATH also makes the
# `python` of a job's entrypoint (run by the head's job supervisor) the virtualenv's, not the system's.
if [[ -x $REPO/.venv/bin/ray ]]; then
    export PATH=$REPO/.venv/bin:$PATH
fi
export RAY_AUTH_MODE=token

usage() {
    cat <<EOF
usage: cluster/local.sh up [--with-worker] [--with-mlflow] | status | env | down

  up             start a Ray head listening on 127.0.0.1 only (dashboard and job server on port
                 $DASHBOARD_PORT), token auth on
  --with-worker  also start a second node on this machine (own temp dir and ports; it advertises the
                 same CPUs again: it exercises multi-node scheduling, not extra compute). Both nodes then
                 listen on the machine's address as well (Ray allows nothing else); token auth guards them
  --with-mlflow  also start an MLflow tracking server on 127.0.0.1:$MLFLOW_PORT
                 (store: $CLUSTER_DIR/mlflow.db, artifacts: $CLUSTER_DIR/mlartifacts)
  status         show what runs, and \`ray status\`
  env            print the exports for: eval "\$(cluster/local.sh env)"
  down           stop the second node, the head and the MLflow server started from $CLUSTER_DIR

environment: DECROP_CLUSTER_DIR (state dir, default <repo>/.cluster), DECROP_GCS_PORT ($GCS_PORT),
  DECROP_DASHBOARD_PORT ($DASHBOARD_PORT), DECROP_CLIENT_PORT ($CLIENT_PORT), DECROP_MLFLOW_PORT ($MLFLOW_PORT),
  DECROP_HEAD_CPUS / DECROP_WORKER_CPUS (default: nproc)
EOF
}

log() { echo "local.sh: $*" >&2; }
die() { log "error: $*"; exit 1; }

port_busy() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# Process groups of the Ray daemons whose command line names temp dir $1 (gcs_server, raylet, dashboard,
# monitors all share the group of the `setsid ray start` that made them). Never our own group.
node_pgids() {
    ps -eo pgid=,args= | NEEDLE="$1/" OWN="$(ps -o pgid= $$ | tr -d ' ')" awk '
        index($0, ENVIRON["NEEDLE"]) && $1 != ENVIRON["OWN"] { print $1 }' | sort -u
}

# Members of the given process groups plus all their descendants (Ray workers get their own groups).
group_pids() {
    [[ $# -gt 0 ]] || return 0
    ps -eo pid=,ppid=,pgid= | GROUPS_="$*" SELF=$$ awk '
        BEGIN { n = split(ENVIRON["GROUPS_"], g, " "); for (i = 1; i <= n; i++) want[g[i]] = 1 }
        { pid[NR] = $1; ppid[NR] = $2; if ($3 in want) keep[$1] = 1 }
        END {
            do { added = 0
                 for (i = 1; i <= NR; i++) if (!(pid[i] in keep) && (ppid[i] in keep)) { keep[pid[i]] = 1; added = 1 }
            } while (added)
            for (p in keep) if (p != ENVIRON["SELF"]) print p
        }'
}

# SIGTERM, wait up to $1 seconds, then SIGKILL what is left. Remaining args: pids.
stop_pids() {
    local grace=$1; shift
    [[ $# -gt 0 ]] || return 0
    kill -TERM "$@" 2>/dev/null || true
    local waited=0
    while ((waited < grace * 2)); do
        # Alive = still listed and not a zombie (killed daemons are re-parented to init, which reaps late).
        local alive
        mapfile -t alive < <(ps -o pid=,stat= -p "$(IFS=,; echo "$*")" | awk '$2 !~ /^Z/ { print $1 }')
        [[ ${#alive[@]} -eq 0 ]] && return 0
        sleep 0.5; waited=$((waited + 1))
    done
    log "killing ${#alive[@]} process(es) still alive after ${grace}s"
    kill -KILL "${alive[@]}" 2>/dev/null || true
}

stop_node() {  # $1: temp dir, $2: name for messages
    local pgids pids
    pgids=$(node_pgids "$1")
    if [[ -z $pgids ]]; then log "$2: not running"; return 0; fi
    # shellcheck disable=SC2086  # word splitting of the id lists is intended
    pids=$(group_pids $pgids)
    log "$2: stopping $(echo $pids | wc -w) process(es) (groups: $(echo $pgids))"
    # shellcheck disable=SC2086
    stop_pids 15 $pids
}

ensure_token() {
    # With RAY_AUTH_MODE=token set, `ray start --head` does not create a token: make one if none exists.
    [[ -n ${RAY_AUTH_TOKEN:-} || -n ${RAY_AUTH_TOKEN_PATH:-} ]] && return 0
    local token=$HOME/.ray/auth_token
    if [[ ! -s $token ]]; then
        # Ray writes it world-readable (0644): a private umask makes it 0600 from the start.
        (umask 077 && ray get-auth-token --generate >/dev/null)
    fi
    chmod 600 "$token"  # a token file made earlier by Ray itself
}

wait_for_url() {  # $1: url, $2: timeout in seconds, then curl options
    local url=$1 timeout=$2; shift 2
    local t=0
    until curl -sf -o /dev/null "$@" "$url"; do
        ((t >= timeout * 2)) && return 1
        sleep 0.5; t=$((t + 1))
    done
}

# Fixed ports of a head (Ray's defaults where this script sets none): a study that ended seconds ago can still
# hold them, and a dashboard that cannot bind them fails or serves nothing.
HEAD_PORTS=("$GCS_PORT:GCS" "$DASHBOARD_PORT:dashboard and job server" "$CLIENT_PORT:Ray client server"
            "52365:dashboard agent" "44217:autoscaler metrics" "44227:dashboard metrics")

port_holder() {  # the process listening on port $1, as "pid N (command)", if ss can tell
    ss -Hltnp "sport = :$1" 2>/dev/null | grep -o 'pid=[0-9]*' | head -1 | cut -d= -f2 |
        xargs -r -I{} ps -o pid=,args= -p {} | awk '{ printf "pid %s (%s)", $1, substr($0, index($0, $2), 60) }'
}

wait_for_free_ports() {  # $1: timeout in seconds
    local timeout=$1 t=0 entry busy
    while :; do
        busy=()
        for entry in "${HEAD_PORTS[@]}"; do port_busy "${entry%%:*}" && busy+=("$entry"); done
        [[ ${#busy[@]} -eq 0 ]] && return 0
        if ((t >= timeout * 2)); then
            for entry in "${busy[@]}"; do log "port ${entry%%:*} (${entry#*:}) is held by $(port_holder "${entry%%:*}")"; done
            return 1
        fi
        ((t % 20 == 0)) && log "waiting for port ${busy[0]%%:*} (${busy[0]#*:}) to be free: held by $(port_holder "${busy[0]%%:*}")"
        sleep 0.5; t=$((t + 1))
    done
}

dashboard_alive() {  # the head's dashboard process (its command line names the head's temp dir)
    ps -eo args= | NEEDLE="$HEAD_DIR/" awk 'index($0, ENVIRON["NEEDLE"]) && /dashboard\/dashboard\.py/ { found = 1 }
                                            END { exit !found }'
}

# Waits for the job server: GET /api/version with the token, what `ray job submit` asks first. Returns 0 when it
# answers 200, 1 when the dashboard process died (transient: the caller retries), exits on a token mismatch.
wait_for_job_server() {  # $1: timeout in seconds
    local timeout=$1 t=0 code
    local token_file=${RAY_AUTH_TOKEN_PATH:-$HOME/.ray/auth_token}
    local token=${RAY_AUTH_TOKEN:-$(cat "$token_file")}
    local url="http://127.0.0.1:$DASHBOARD_PORT/api/version" source=$token_file
    [[ -n ${RAY_AUTH_TOKEN:-} ]] && source='$RAY_AUTH_TOKEN'
    while :; do
        code=$(curl -s -o /dev/null -w '%{http_code}' --max-time 5 \
                    -H @<(printf 'Authorization: Bearer %s\n' "$token") "$url" || true)
        case $code in
            200) return 0 ;;
            401|403) die "the job server on 127.0.0.1:$DASHBOARD_PORT rejects the token of $source (HTTP $code): another cluster's token? run: cluster/local.sh down" ;;
        esac
        dashboard_alive || { log "the dashboard process of the head exited (log: $HEAD_DIR/session_latest/logs/dashboard.log)"; return 1; }
        ((t >= timeout * 2)) && die "the job server did not answer GET /api/version on 127.0.0.1:$DASHBOARD_PORT within $timeout s although the dashboard process runs (last answer: ${code/#000/no connection}; log: $HEAD_DIR/session_latest/logs/dashboard.log); stop it with: cluster/local.sh down"
        ((t % 20 == 0)) && log "waiting for the job server: GET $url answers ${code/#000/no connection} (need 200)"
        sleep 0.5; t=$((t + 1))
    done
}

start_head() {  # $1: 1 = loopback only, 0 = the machine's address (a second node must reach it)
    local loopback=$1
    [[ -z $(node_pgids "$HEAD_DIR") ]] ||
        die "a Ray head already runs from $HEAD_DIR; run: cluster/local.sh down"
    local attempt
    for attempt in 1 2 3; do
        # A cluster stopped moments ago frees its ports late (up to ~30 s seen): that is worth waiting for.
        wait_for_free_ports 60 || die "ports of the head are in use (above): another Ray cluster or study runs here"
        log "starting Ray head ($HEAD_CPUS CPUs, temp dir $HEAD_DIR, log $CLUSTER_DIR/ray-head.log), attempt $attempt of 3"
        # setsid: the daemons get a process group of their own, which `down` stops as a unit.
        # RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0: the node's address is 127.0.0.1, so GCS, raylet, workers, agents and
        # the metrics exporters listen on loopback (with 1: 0.0.0.0/:: or the machine's address). Ray resolves
        # 127.0.0.1 given to a node or client to the machine's address unless the flag is 0, so a second node
        # (which Ray refuses under 0) could not reach such a head: --with-worker keeps the machine's address.
        # --include-dashboard=true: `ray start` waits for the dashboard to register in GCS (Ray's own readiness
        # signal) and fails if it does not; by default a dead dashboard is only logged and `ray start` succeeds.
        if RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=$((1 - loopback)) setsid -w ray start --head --num-cpus="$HEAD_CPUS" --port="$GCS_PORT" \
               --include-dashboard=true --dashboard-host=127.0.0.1 --dashboard-port="$DASHBOARD_PORT" \
               --ray-client-server-port="$CLIENT_PORT" --disable-usage-stats --temp-dir="$HEAD_DIR" \
               >"$CLUSTER_DIR/ray-head.log" 2>&1; then
            log "head started; waiting for the job server (GET /api/version with the token)"
            wait_for_job_server 180 && return 0
        else
            tail -20 "$CLUSTER_DIR/ray-head.log" >&2
            grep -q "AF_UNIX path length" "$CLUSTER_DIR/ray-head.log" &&
                die "the state dir $CLUSTER_DIR is too long for Ray's socket paths: set DECROP_CLUSTER_DIR to a shorter one"
            log "ray start --head failed (attempt $attempt)"
        fi
        stop_node "$HEAD_DIR" "head"  # what the failed attempt left running
    done
    die "the Ray head did not come up in 3 attempts (logs: $CLUSTER_DIR/ray-head.log, $HEAD_DIR/session_latest/logs)"
}

start_worker() {
    [[ -z $(node_pgids "$WORKER_DIR") ]] || die "a second node already runs from $WORKER_DIR"
    log "starting second node ($WORKER_CPUS CPUs, temp dir $WORKER_DIR, log $CLUSTER_DIR/ray-worker.log)"
    # Its own temp dir and its own fixed ports (the head keeps Ray's defaults: agent 52365, workers 10002-19999).
    # Ray refuses a second node under RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0; with 1 it takes the machine's address
    # and listens on all interfaces, like the head started for it (token auth guards both; cluster/README.md).
    RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=1 setsid -w ray start --address="127.0.0.1:$GCS_PORT" --num-cpus="$WORKER_CPUS" \
        --disable-usage-stats --temp-dir="$WORKER_DIR" \
        --dashboard-agent-listen-port=52366 --min-worker-port=20002 --max-worker-port=20999 \
        >"$CLUSTER_DIR/ray-worker.log" 2>&1 ||
        { tail -20 "$CLUSTER_DIR/ray-worker.log" >&2; die "ray start (second node) failed"; }
}

start_mlflow() {
    local pidfile=$CLUSTER_DIR/mlflow.pid
    if [[ -s $pidfile ]] && kill -0 "$(cat "$pidfile")" 2>/dev/null; then
        die "an MLflow server already runs (pid $(cat "$pidfile"))"
    fi
    port_busy "$MLFLOW_PORT" && die "port $MLFLOW_PORT is in use"
    mkdir -p "$CLUSTER_DIR/mlartifacts"
    log "starting MLflow server on 127.0.0.1:$MLFLOW_PORT (log $CLUSTER_DIR/mlflow.log)"
    # Job execution off: the server then needs ~0.5 GB instead of ~2.3 GB (MLflow 3.17).
    MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false setsid mlflow server --host 127.0.0.1 --port "$MLFLOW_PORT" \
        --backend-store-uri "sqlite:///$CLUSTER_DIR/mlflow.db" \
        --artifacts-destination "$CLUSTER_DIR/mlartifacts" >"$CLUSTER_DIR/mlflow.log" 2>&1 </dev/null &
    echo $! >"$pidfile"  # setsid does not fork here (the background child is no group leader): pid == pgid
    wait_for_url "http://127.0.0.1:$MLFLOW_PORT/health" 90 ||
        { tail -20 "$CLUSTER_DIR/mlflow.log" >&2; die "MLflow server did not answer on /health within 90 s"; }
}

stop_mlflow() {
    local pidfile=$CLUSTER_DIR/mlflow.pid
    if [[ ! -s $pidfile ]] || ! kill -0 "$(cat "$pidfile")" 2>/dev/null; then
        log "mlflow: not running"; rm -f "$pidfile"; return 0
    fi
    local pids
    pids=$(group_pids "$(cat "$pidfile")")
    log "mlflow: stopping $(echo $pids | wc -w) process(es)"
    # shellcheck disable=SC2086
    stop_pids 15 $pids
    rm -f "$pidfile"
}

print_env() {
    # RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0: `ray status` and `ray.init(address=...)` reach a loopback head at
    # 127.0.0.1 (with 1 they resolve it to the machine's address, where it does not listen).
    echo "export RAY_ADDRESS=http://127.0.0.1:$DASHBOARD_PORT RAY_AUTH_MODE=token RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0"
    [[ $REPO/.venv/bin/ray -ef $(command -v ray) ]] && echo "export PATH=$REPO/.venv/bin:\$PATH"
    return 0
}

cmd_up() {
    local with_worker=0 with_mlflow=0
    for arg in "$@"; do
        case $arg in
            --with-worker) with_worker=1 ;;
            --with-mlflow) with_mlflow=1 ;;
            -h|--help) usage; exit 0 ;;
            *) usage >&2; die "unknown option: $arg" ;;
        esac
    done
    command -v ray >/dev/null || die "ray not found (expected $REPO/.venv/bin/ray or on PATH)"
    mkdir -p "$CLUSTER_DIR"
    ensure_token
    if ((with_worker)); then
        log "--with-worker: the head listens on the machine's address, not only on 127.0.0.1 (token auth guards it)"
    fi
    start_head $((1 - with_worker))
    ((with_worker)) && start_worker
    ((with_mlflow)) && start_mlflow
    local token=${RAY_AUTH_TOKEN_PATH:-$HOME/.ray/auth_token}
    local submit="ray job submit --working-dir . --runtime-env cluster/runtime_env.yaml -- python tuning/sweep.py --num-trials 2"
    ((with_mlflow)) && submit+=" --mlflow-uri http://127.0.0.1:$MLFLOW_PORT"
    cat <<EOF

Ray dashboard and job server: http://127.0.0.1:$DASHBOARD_PORT (token auth: the browser asks for the token in $token)
$( ((with_mlflow)) && echo "MLflow: http://127.0.0.1:$MLFLOW_PORT/#/experiments/<id>/runs?workflowType=machine_learning")

Next, in your shell:
  $(print_env | paste -sd ';' | sed 's/;/; /')
  $submit
Stop with: cluster/local.sh down
EOF
}

cmd_status() {
    local rc=0
    for node in "$HEAD_DIR:head" "$WORKER_DIR:second node"; do
        local pgids; pgids=$(node_pgids "${node%%:*}")
        # shellcheck disable=SC2086
        if [[ -n $pgids ]]; then echo "${node#*:}: running ($(group_pids $pgids | wc -l) processes)"
        else echo "${node#*:}: not running"; fi
    done
    if [[ -s $CLUSTER_DIR/mlflow.pid ]] && kill -0 "$(cat "$CLUSTER_DIR/mlflow.pid")" 2>/dev/null; then
        echo "mlflow: running (pid $(cat "$CLUSTER_DIR/mlflow.pid")), http://127.0.0.1:$MLFLOW_PORT"
    else
        echo "mlflow: not running"
    fi
    if [[ -n $(node_pgids "$HEAD_DIR") ]]; then
        RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 ray status --address="127.0.0.1:$GCS_PORT" || rc=$?
    fi
    return $rc
}

cmd_down() {
    stop_node "$WORKER_DIR" "second node"
    stop_node "$HEAD_DIR" "head"
    stop_mlflow
    # Ports can stay taken for a while after the processes are gone (up to ~30 s seen): wait, so that an
    # `up` right after `down` works.
    local t=0
    while port_busy "$GCS_PORT" || port_busy "$DASHBOARD_PORT" || port_busy "$CLIENT_PORT"; do
        if ((t >= 60)); then log "ports $GCS_PORT/$DASHBOARD_PORT/$CLIENT_PORT still in use after 30 s"; return 1; fi
        sleep 0.5; t=$((t + 1))
    done
}

case ${1:-} in
    up) shift; cmd_up "$@" ;;
    down) cmd_down ;;
    status) cmd_status ;;
    env) print_env ;;
    -h|--help|help) usage ;;
    *) usage >&2; exit 2 ;;
esac

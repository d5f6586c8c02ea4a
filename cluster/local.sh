#!/usr/bin/env bash
# A real multi-node Ray cluster on one machine: a head and N worker nodes, each its own raylet with its
# own CPUs and a node label (ftray.io/node=head|worker-1..N), token auth on, the dashboard on 127.0.0.1.
#
#   cluster/local.sh up 2                 # head + 2 workers; prints what a client needs
#   source /tmp/ftray-cluster-$UID/env    # addresses for ray/serve CLIs and ray.init, RAY_AUTH_MODE, RAY_AUTH_TOKEN_PATH
#   ray job submit --working-dir . -- ftray train jobs/quickstart_tiny.yaml \
#     --set scaling.placement_strategy=STRICT_SPREAD --set output.dir=$PWD/runs/q
#   cluster/local.sh status
#   cluster/local.sh down
#
# Settings (environment):
#   FTRAY_CLUSTER_DIR      state, logs and Ray's temp dir (default /tmp/ftray-cluster-$UID; keep it short:
#                          Ray's unix sockets live under it and their paths are limited to ~107 bytes)
#   FTRAY_RAY_TOKEN        the token file (default ~/.ftray/ray_token; created with mode 600 when absent)
#   FTRAY_RAY_PORT         GCS port (default 6379)       FTRAY_DASHBOARD_PORT   dashboard port (default 8265)
#   FTRAY_HEAD_CPUS        head CPUs (default 0: training workers land on worker nodes only)
#   FTRAY_WORKER_CPUS      CPUs per worker node (default 2)
#   FTRAY_OBJECT_STORE_MB  object store per node (default 512)
#
# `down` stops only what `up` started: each node's `ray start --block` (SIGTERM, which stops its node),
# then anything left in those processes' sessions or naming this cluster's temp dir. It never runs
# `ray stop`, which would stop every Ray cluster on the machine.
set -euo pipefail

DIR=${FTRAY_CLUSTER_DIR:-/tmp/ftray-cluster-$(id -u)}
TOKEN=${FTRAY_RAY_TOKEN:-$HOME/.ftray/ray_token}
GCS_PORT=${FTRAY_RAY_PORT:-6379}
DASH_PORT=${FTRAY_DASHBOARD_PORT:-8265}
HEAD_CPUS=${FTRAY_HEAD_CPUS:-0}
WORKER_CPUS=${FTRAY_WORKER_CPUS:-2}
STORE_MB=${FTRAY_OBJECT_STORE_MB:-512}
RAY=${RAY:-$(command -v ray || true)}
PY=$(dirname "${RAY:-/nonexistent/ray}")/python
[ -x "$PY" ] || PY=python3

die() { echo "local.sh: $*" >&2; exit 1; }

free_port() { "$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

port_in_use() { "$PY" -c 'import socket, sys; s = socket.socket(); sys.exit(s.connect_ex(("127.0.0.1", int(sys.argv[1]))) != 0)' "$1"; }

ensure_token() {
  if [ ! -s "$TOKEN" ]; then
    mkdir -p "$(dirname "$TOKEN")" && chmod 700 "$(dirname "$TOKEN")"
    (umask 077 && "$PY" -c 'import secrets; print(secrets.token_hex(32))' > "$TOKEN")
    echo "local.sh: wrote a new token to $TOKEN"
  fi
  chmod 600 "$TOKEN"
}

# Every port with a fixed default gets a free one, so this cluster and others on the machine never collide.
start_node() {  # name cpus [ray start args...]
  local name=$1 cpus=$2
  shift 2
  # setsid: each node in its own session, so `down` can find everything it started and nothing else.
  # agent_register_timeout_ms: a raylet waits this long for its dashboard agent to come up; the
  # default gives up on a loaded 2-core machine with a few nodes starting (the agent took 21 s).
  env -u RAY_ADDRESS -u RAY_AUTH_TOKEN RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH="$TOKEN" \
    RAY_agent_register_timeout_ms="${RAY_agent_register_timeout_ms:-120000}" \
    setsid "$RAY" start --block --node-ip-address=127.0.0.1 --temp-dir="$DIR/ray" --disable-usage-stats \
    --num-cpus="$cpus" --labels="ftray.io/node=$name" --object-store-memory=$((STORE_MB * 1024 * 1024)) \
    --dashboard-agent-listen-port="$(free_port)" --dashboard-agent-grpc-port="$(free_port)" \
    --metrics-export-port="$(free_port)" --runtime-env-agent-port="$(free_port)" "$@" \
    > "$DIR/logs/$name.log" 2>&1 < /dev/null &
  echo "$! $name" >> "$DIR/pids"
}

# ALIVE nodes as "label cpus" lines, through the dashboard's state API (with the token).
nodes() {
  RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH="$TOKEN" "$PY" - "${DASH_URL:-http://127.0.0.1:$DASH_PORT}" <<'EOF'
import sys
from ray.util.state import list_nodes
for n in list_nodes(address=sys.argv[1], filters=[("state", "=", "ALIVE")], detail=True, raise_on_missing_output=False):
    print(n.labels.get("ftray.io/node", "?"), int(n.resources_total.get("CPU", 0)), n.node_id)
EOF
}

alive_pids() { [ -f "$DIR/pids" ] && while read -r pid _; do kill -0 "$pid" 2>/dev/null && echo "$pid"; done < "$DIR/pids" || true; }

wait_nodes() {  # want timeout pid name: 0 once `want` nodes are alive; 1 if node `name` exits or time runs out
  local want=$1 deadline=$((SECONDS + $2)) pid=$3 name=$4 have=0
  while [ $SECONDS -lt $deadline ]; do
    if ! kill -0 "$pid" 2>/dev/null; then
      echo "local.sh: node $name exited while starting; the end of $DIR/logs/$name.log:" >&2
      tail -n 5 "$DIR/logs/$name.log" >&2
      return 1
    fi
    have=$(nodes 2>/dev/null | wc -l || true)
    [ "$have" -ge "$want" ] && return 0
    sleep 1
  done
  echo "local.sh: $have of $want nodes alive after $2 s" >&2
  return 1
}

stop_sessions() {  # pids of `ray start --block` processes: SIGTERM them, then SIGKILL what is left
  local pids=" $* " left
  for pid in $(printf '%s\n' "$@" | tac); do kill -TERM "$pid" 2>/dev/null || true; done
  for _ in $(seq 1 30); do
    left=""
    for pid in "$@"; do kill -0 "$pid" 2>/dev/null && left=1; done
    [ -z "$left" ] && break
    sleep 0.5
  done
  # Each node runs in its own session (setsid): whatever of it is still around has that session id.
  in_sessions() { ps -eo pid=,sid=,stat= | awk -v s="$pids" 'index(s, " " $2 " ") && $3 !~ /^Z/ {print $1}'; }
  for pid in $(in_sessions); do kill -KILL "$pid" 2>/dev/null || true; done
  for _ in $(seq 1 20); do [ -z "$(in_sessions)" ] && break; sleep 0.5; done
}

# Ray gives a new raylet 30 s to register with the GCS, which a loaded 2-core machine can miss: a node
# that gives up is cleaned away and started once more.
add_node() {  # want name cpus [ray start args...]
  local want=$1 pid
  shift
  for attempt in 1 2; do
    start_node "$@"
    pid=$(tail -n 1 "$DIR/pids" | cut -d' ' -f1)
    wait_nodes "$want" 120 "$pid" "$1" && return 0
    stop_sessions "$pid"
    sed -i '$d' "$DIR/pids"
    [ $attempt = 1 ] && echo "local.sh: starting node $1 again" >&2
  done
  die "node $1 did not come up (logs: $DIR/logs/); \`local.sh down\` cleans up"
}

need_ray() { [ -n "$RAY" ] || die "no \`ray\` on PATH (activate the venv ftray is installed in)"; }

cmd_up() {
  local n=${1:-}
  [[ "$n" =~ ^[0-9]+$ ]] || die "usage: local.sh up N   (N worker nodes)"
  need_ray
  [ -z "$(alive_pids)" ] || die "a cluster from $DIR is running; \`local.sh down\` first"
  command -v setsid > /dev/null || die "needs \`setsid\` (util-linux)"
  port_in_use "$GCS_PORT" && die "port $GCS_PORT is taken (another Ray?); set FTRAY_RAY_PORT"
  port_in_use "$DASH_PORT" && die "port $DASH_PORT is taken; set FTRAY_DASHBOARD_PORT"
  ensure_token
  mkdir -p "$DIR/logs" && rm -f "$DIR/pids"
  add_node 1 head "$HEAD_CPUS" --head --port="$GCS_PORT" --include-dashboard=true \
    --dashboard-host=127.0.0.1 --dashboard-port="$DASH_PORT" --ray-client-server-port="$(free_port)"
  for i in $(seq 1 "$n"); do  # one at a time: starting raylets together overloads a small machine
    add_node $((i + 1)) "worker-$i" "$WORKER_CPUS" --address="127.0.0.1:$GCS_PORT"
  done
  cat > "$DIR/env" <<EOF
export RAY_ADDRESS=127.0.0.1:$GCS_PORT
export RAY_API_SERVER_ADDRESS=http://127.0.0.1:$DASH_PORT
export RAY_DASHBOARD_ADDRESS=http://127.0.0.1:$DASH_PORT
export RAY_AUTH_MODE=token
export RAY_AUTH_TOKEN_PATH=$TOKEN
EOF
  echo "local.sh: up: head + $n workers; dashboard http://127.0.0.1:$DASH_PORT; token $TOKEN"
  echo "  source $DIR/env   # then: ray job submit --working-dir . -- ftray train ..."
}

cmd_status() {
  [ -n "$(alive_pids)" ] || { echo "local.sh: no cluster from $DIR is running"; return 1; }
  # The dashboard and token this cluster was started with, whatever this shell's settings are.
  DASH_URL=$(sed -n 's/^export RAY_DASHBOARD_ADDRESS=//p' "$DIR/env")
  TOKEN=$(sed -n 's/^export RAY_AUTH_TOKEN_PATH=//p' "$DIR/env")
  nodes
}

cmd_down() {
  [ -f "$DIR/pids" ] || { echo "local.sh: no cluster from $DIR"; return 0; }
  # Workers first (tac), the head last: a worker whose GCS is gone waits for it before giving up.
  stop_sessions $(awk '{print $1}' "$DIR/pids")
  # Leftovers outside those sessions: processes whose command line names this cluster's temp dir.
  for pid in $(pgrep -f -- "$DIR/ray/" || true); do kill -KILL "$pid" 2>/dev/null || true; done
  for _ in $(seq 1 20); do pgrep -f -- "$DIR/ray/" > /dev/null || break; sleep 0.5; done
  rm -rf "$DIR/ray" "$DIR/pids" "$DIR/env"
  echo "local.sh: down"
}

case "${1:-}" in
  up) cmd_up "${2:-}" ;;
  down) cmd_down ;;
  status) cmd_status ;;
  *) echo "usage: local.sh up N | down | status" >&2; exit 2 ;;
esac

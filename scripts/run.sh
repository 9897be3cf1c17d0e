#!/usr/bin/env bash
# The README's run command (`make run`): from a fresh machine to a running appliance.
# Installs what is needed, migrates, creates the admin account and a demo export, starts
# Redis when REDIS_URL is unset, the Celery engine worker (which runs the NBD engine),
# Celery beat and gunicorn, then prints the URLs, an API token and the demo's nbd:// URI.
# Ctrl-C (or SIGTERM) stops everything it started.
#
#   scripts/run.sh [--role all|central|node]
#
# --role all (the default): everything above on this host, as `make run`.
# --role central: the web (gunicorn), Celery beat and a Celery worker for the general
#   "appliance" queue; no storage and no NBD engine here. Migrates and bootstraps (no demo
#   export: images live on the nodes). Starts its own Redis when REDIS_URL is unset.
# --role node: a storage host: only the Celery engine worker (queue engine.<node>, which
#   owns the NBD engine), against the central host's database and Redis: DATABASE_URL and
#   REDIS_URL are required, and no Redis is started here.
#
# Environment: WEB_PORT (8000), NBD_PORT (10809), WEB_BIND/NBD_BIND (127.0.0.1),
# APPLIANCE_VAR_DIR (./var), DATABASE_URL (SQLite in var/), REDIS_URL (a redis-server of
# its own), APPLIANCE_ADMIN_USER / APPLIANCE_ADMIN_PASSWORD (admin / generated),
# APPLIANCE_NODE_NAME (the host name), STORAGE_ROOT (var/images), NBD_PUBLIC_HOST.
set -euo pipefail
cd "$(dirname "$0")/.."

role=all
while [ "$#" -gt 0 ]; do
    case "$1" in
        --role) role="${2:-}"; shift 2 || { echo "--role needs a value" >&2; exit 2; } ;;
        --role=*) role="${1#--role=}"; shift ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "unknown argument: $1 (usage: scripts/run.sh [--role all|central|node])" >&2
           exit 2 ;;
    esac
done
case "$role" in
    all|central|node) ;;
    *) echo "--role must be all, central or node; got '$role'" >&2; exit 2 ;;
esac
if [ "$role" = node ]; then
    for var in DATABASE_URL REDIS_URL; do
        if [ -z "${!var:-}" ]; then
            echo "--role node needs $var: the central host's database and Redis" >&2
            exit 2
        fi
    done
fi
export APPLIANCE_ROLE="$role"

scripts/install-test-deps.sh --runtime >&2

export APPLIANCE_VAR_DIR="${APPLIANCE_VAR_DIR:-$PWD/var}"
export WEB_BIND="${WEB_BIND:-127.0.0.1}" WEB_PORT="${WEB_PORT:-8000}"
export NBD_BIND="${NBD_BIND:-127.0.0.1}" NBD_PORT="${NBD_PORT:-10809}"
export DJANGO_SETTINGS_MODULE=appliance.settings
run_dir="$APPLIANCE_VAR_DIR/run"
mkdir -p "$run_dir"
PY=.venv/bin/python
pids=()

stopping=0
stop_all() {
    # A second signal must not cut the stop short: `kill -TERM -- -PGID` reaches this
    # shell twice (make passes SIGTERM on to it), and the default action would leave
    # the components running without us.
    trap '' INT TERM
    trap - EXIT
    stopping=1
    echo "stopping..." >&2
    # Newest first, each drained before the next: the web, beat, the engine worker (which
    # drains its NBD clients), and Redis last so the engine can still report.
    for ((i=${#pids[@]}-1; i>=0; i--)); do
        kill -TERM "${pids[i]}" 2>/dev/null || true
        wait "${pids[i]}" 2>/dev/null || true
    done
    echo "stopped" >&2
}
trap stop_all INT TERM EXIT

if [ -z "${REDIS_URL:-}" ]; then
    redis_port=$($PY -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
    setsid redis-server --bind 127.0.0.1 --port "$redis_port" --save "" --appendonly no \
        --dir "$run_dir" --logfile "$run_dir/redis.log" &
    pids+=($!)
    export REDIS_URL="redis://127.0.0.1:$redis_port/0"
    for _ in $(seq 50); do
        redis-cli -p "$redis_port" ping >/dev/null 2>&1 && break
        sleep 0.1
    done
fi

node=$($PY -c 'import django; django.setup(); from django.conf import settings; print(settings.APPLIANCE_NODE_NAME)')

if [ "$role" = node ]; then
    # A storage host: the engine worker only. The central host migrates and bootstraps.
    setsid .venv/bin/celery -A appliance worker --engine -Q "engine.$node" -P threads -c 4 \
        -n "engine@$node" --loglevel INFO >"$run_dir/worker.log" 2>&1 &
    pids+=($!)
    $PY manage.py engine_wait --timeout 60 >&2
    $PY - "$node" <<'PYEOF'
import os, sys
host = os.environ.get("NBD_PUBLIC_HOST") or os.environ["NBD_BIND"]
host = f"[{host}]" if ":" in host else host
print(f"node:      {sys.argv[1]}")
print(f"nbd:       nbd://{host}:{os.environ['NBD_PORT']}/")
print(f"redis:     {os.environ['REDIS_URL']}")
print("role:      node")
print("ready (Ctrl-C stops everything)", flush=True)
PYEOF
    wait -n "${pids[@]}" || true
    [ "$stopping" -eq 1 ] || echo "a component exited; see $run_dir/*.log" >&2
    exit 0
fi

$PY manage.py migrate --no-input >&2
if [ "$role" = central ]; then
    bootstrap=$($PY manage.py appliance_bootstrap --no-demo)
    # The general queue only: engine.<node> queues belong to the storage hosts.
    setsid .venv/bin/celery -A appliance worker -Q appliance -P threads -c 4 \
        -n "central@$node" --loglevel INFO >"$run_dir/worker.log" 2>&1 &
    pids+=($!)
else
    bootstrap=$($PY manage.py appliance_bootstrap)
    setsid .venv/bin/celery -A appliance worker --engine -Q "engine.$node,appliance" -P threads -c 4 \
        -n "engine@$node" --loglevel INFO >"$run_dir/worker.log" 2>&1 &
    pids+=($!)
fi
setsid .venv/bin/celery -A appliance beat --loglevel INFO -s "$run_dir/celerybeat-schedule" \
    >"$run_dir/beat.log" 2>&1 &
pids+=($!)
setsid .venv/bin/gunicorn -c deploy/gunicorn.conf.py appliance.wsgi >"$run_dir/web.log" 2>&1 &
pids+=($!)

[ "$role" = central ] || $PY manage.py engine_wait --export demo --timeout 60 >&2
for _ in $(seq 100); do
    $PY -c "import socket,sys; socket.create_connection(('$WEB_BIND', $WEB_PORT), 1)" 2>/dev/null && break
    sleep 0.1
done

$PY - "$bootstrap" "$node" "$role" <<'PYEOF'
import json, os, sys
info = json.loads(sys.argv[1])
web = f"http://{os.environ['WEB_BIND']}:{os.environ['WEB_PORT']}"
print(f"dashboard: {web}/")
print(f"api:       {web}/api/v1/  (schema UI: {web}/api/schema/ui/)")
print(f"metrics:   {web}/metrics")
if "password" in info:
    print(f"admin:     {info['username']} / {info['password']}")
else:
    print(f"admin:     {info['username']} (password unchanged)")
print(f"token:     {info['token']}")
if "demo_uri" in info:
    print(f"nbd:       {info['demo_uri']}")
print(f"node:      {sys.argv[2]}")
print(f"redis:     {os.environ['REDIS_URL']}")
if sys.argv[3] != "all":
    print(f"role:      {sys.argv[3]}")
print("ready (Ctrl-C stops everything)", flush=True)
PYEOF

wait -n "${pids[@]}" || true
[ "$stopping" -eq 1 ] || echo "a component exited; see $run_dir/*.log" >&2

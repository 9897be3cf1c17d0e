#!/usr/bin/env bash
# Makes sure a PostgreSQL server answers on 127.0.0.1:${PGPORT:-5432} for the tests, then
# prints the DATABASE_URL to use. Uses the server that is already running if there is one;
# otherwise installs Debian's postgresql (apt-get, no prompts), then starts the cluster
# configured on that port, creating one if there is none. Safe to run again and again.
#
# The URL names the user postgres with the password postgres: a server with trust
# authentication ignores the password; on a cluster this script starts, it is set.
set -euo pipefail

HOST=127.0.0.1
PORT="${PGPORT:-5432}"
DB="${APPLIANCE_TEST_DB:-nbd_appliance}"
URL="postgresql://postgres:postgres@${HOST}:${PORT}/${DB}"
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"

log() { echo "ensure-postgres: $*" >&2; }

accepting() {
    if command -v pg_isready >/dev/null 2>&1; then
        pg_isready -q -h "$HOST" -p "$PORT" -t 2
    else
        (exec 3<>"/dev/tcp/$HOST/$PORT") 2>/dev/null
    fi
}

can_login() {
    PGPASSWORD=postgres PGCONNECT_TIMEOUT=5 \
        psql -h "$HOST" -p "$PORT" -U postgres -d postgres -Atqc 'select 1' >/dev/null 2>&1
}

if accepting; then
    if ! command -v psql >/dev/null 2>&1 || can_login; then
        echo "$URL"
        exit 0
    fi
    log "a server answers on $HOST:$PORT but refuses user postgres (password postgres)"
    exit 1
fi

if ! command -v pg_ctlcluster >/dev/null 2>&1 || ! ls /usr/lib/postgresql/*/bin/postgres \
        >/dev/null 2>&1; then
    log "no PostgreSQL server here: installing Debian's postgresql"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends \
        postgresql >&2
fi

# pg_lsclusters: Ver Cluster Port Status Owner Data-directory Log-file
cluster=$(pg_lsclusters --no-header 2>/dev/null | awk -v port="$PORT" '$3 == port {print $1, $2; exit}')
if [ -z "$cluster" ]; then
    version=$(ls /usr/lib/postgresql | sort -V | tail -n 1)
    name=main
    if pg_lsclusters --no-header 2>/dev/null | awk '{print $1, $2}' | grep -qx "$version main"; then
        name="appliance$PORT"  # main exists on another port: keep it, make our own
    fi
    log "creating cluster $version/$name on port $PORT"
    $SUDO pg_createcluster "$version" "$name" --port "$PORT" >&2
    cluster="$version $name"
fi
read -r version name <<<"$cluster"
log "starting cluster $version/$name"
$SUDO pg_ctlcluster "$version" "$name" start >&2 || true  # already running is fine

for _ in $(seq 1 60); do
    accepting && break
    sleep 0.5
done
if ! accepting; then
    log "cluster $version/$name did not start on $HOST:$PORT"
    exit 1
fi
if command -v psql >/dev/null 2>&1 && ! can_login; then
    # A fresh Debian cluster checks passwords over TCP: give postgres the one in the URL.
    (cd / && $SUDO runuser -u postgres -- psql -p "$PORT" -qc \
        "ALTER USER postgres PASSWORD 'postgres'") >&2
fi
echo "$URL"

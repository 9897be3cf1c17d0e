#!/usr/bin/env bash
# The README's test command (`make test`): install what the tests need, then run them all.
# With no arguments: the whole suite on SQLite, then the appliance and API tests again on
# PostgreSQL (scripts/ensure-postgres.sh finds or starts one). With arguments: one pytest
# run with those arguments, on whatever DATABASE_URL says (SQLite when unset).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-test-deps.sh
mkdir -p artifacts
.venv/bin/ruff check nbdcore tests bench appliance frontend

pytest_run() {
    set +e
    "$@"
    local status=$?
    set -e
    if [ "$status" -eq 5 ]; then
        echo "pytest collected no tests: that is a failure here" >&2
        return 1
    fi
    return "$status"
}

if [ "$#" -gt 0 ]; then
    pytest_run .venv/bin/python -m pytest "$@"
    exit $?
fi

# PostgreSQL first: the several-hosts end-to-end test (in the SQLite pass) needs a server
# to make its shared database on, as well as the second pass.
database_url=$(scripts/ensure-postgres.sh)

status=0
echo "== the whole suite, appliance on SQLite"
pytest_run env -u DATABASE_URL .venv/bin/python -m pytest || status=$?

echo "== the appliance and API tests on PostgreSQL"
pytest_run env DATABASE_URL="$database_url" .venv/bin/python -m pytest -p no:cacheprovider \
    tests/appliance tests/api || status=$?
exit "$status"

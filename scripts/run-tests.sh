#!/usr/bin/env bash
# The README's test command (`make test`): install what the tests need, then run them all.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-test-deps.sh
mkdir -p artifacts
.venv/bin/ruff check nbdcore tests bench
set +e
.venv/bin/python -m pytest "$@"
status=$?
set -e
if [ "$status" -eq 5 ]; then
    echo "pytest collected no tests: that is a failure here" >&2
    exit 1
fi
exit "$status"

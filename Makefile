.PHONY: test lint run bench serve clean

# Installs Debian packages (qemu-utils, libnbd-bin, python3-libnbd, nbdkit, fio, xfsprogs)
# and the Python packages into .venv, then runs the whole suite on SQLite and the appliance
# and API tests again on PostgreSQL (found or started by scripts/ensure-postgres.sh).
test:
	scripts/run-tests.sh

lint:
	scripts/install-test-deps.sh
	.venv/bin/ruff check nbdcore tests bench appliance frontend

# The whole appliance on this machine: Redis (its own unless REDIS_URL is set), the Celery
# engine worker serving NBD, Celery beat and gunicorn; prints the URLs, a token and the
# demo export's nbd:// URI. Ctrl-C stops everything.
run:
	scripts/run.sh

# Side-by-side figures against qemu-nbd and nbdkit (see bench/README in the README).
bench:
	scripts/install-test-deps.sh
	.venv/bin/python bench/nbdbench.py

# Serve an image standalone: make serve IMAGE=disk.raw
serve:
	python3 -m nbdcore serve $(IMAGE) --port $(or $(PORT),10809)

clean:
	rm -rf .venv .pytest_cache .hypothesis artifacts

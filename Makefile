.PHONY: test lint run bench serve clean

# Installs Debian packages (qemu-utils, libnbd-bin, python3-libnbd, nbdkit, fio, xfsprogs)
# and the Python packages into .venv, then runs the whole suite on SQLite and the appliance
# and API tests again on PostgreSQL (found or started by scripts/ensure-postgres.sh).
test:
	scripts/run-tests.sh

lint:
	scripts/install-test-deps.sh
	.venv/bin/ruff check nbdcore tests bench appliance

# The appliance's web side (API, schema UI, admin) on http://127.0.0.1:8000/, with the
# database migrated first (SQLite under var/ unless DATABASE_URL is set).
run:
	scripts/install-test-deps.sh
	.venv/bin/python manage.py migrate
	.venv/bin/python manage.py runserver 127.0.0.1:$(or $(PORT),8000)

# Side-by-side figures against qemu-nbd and nbdkit (see bench/README in the README).
bench:
	scripts/install-test-deps.sh
	.venv/bin/python bench/nbdbench.py

# Serve an image standalone: make serve IMAGE=disk.raw
serve:
	python3 -m nbdcore serve $(IMAGE) --port $(or $(PORT),10809)

clean:
	rm -rf .venv .pytest_cache .hypothesis artifacts

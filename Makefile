.PHONY: test lint bench serve clean

# Installs Debian packages (qemu-utils, libnbd-bin, python3-libnbd, nbdkit, fio) and the
# Python test packages into .venv, then runs the whole suite.
test:
	scripts/run-tests.sh

lint:
	scripts/install-test-deps.sh
	.venv/bin/ruff check nbdcore tests bench

# Side-by-side figures against qemu-nbd and nbdkit (see bench/README in the README).
bench:
	scripts/install-test-deps.sh
	.venv/bin/python bench/nbdbench.py

# Serve an image standalone: make serve IMAGE=disk.raw
serve:
	python3 -m nbdcore serve $(IMAGE) --port $(or $(PORT),10809)

clean:
	rm -rf .venv .pytest_cache .hypothesis artifacts

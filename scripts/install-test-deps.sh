#!/usr/bin/env bash
# Installs everything the test suite needs on a fresh Debian machine, then nothing more:
# Debian's NBD clients and peers, redis-server (the run command and the engine worker
# tests start their own), xfsprogs (a reflink filesystem for the clone test), chromium
# (the dashboard's browser tests), qemu-system-x86 with a kernel, busybox and syslinux
# (the VM boot test builds its disk from them), and the Python packages in .venv. PostgreSQL is scripts/ensure-postgres.sh's business.
set -euo pipefail
cd "$(dirname "$0")/.."

DEBIAN_PACKAGES=(qemu-utils libnbd-bin python3-libnbd nbdkit fio xfsprogs redis-server chromium
    qemu-system-x86 linux-image-amd64 busybox-static syslinux syslinux-common mtools dosfstools
    e2fsprogs)

# `--runtime` (used by `make run`): only what running the appliance needs.
extras="[test]"
if [ "${1:-}" = "--runtime" ]; then
    DEBIAN_PACKAGES=(redis-server)
    extras=""
fi

missing=()
for pkg in "${DEBIAN_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if ((${#missing[@]})); then
    echo "installing Debian packages: ${missing[*]}"
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    if ! "$PYTHON" -m venv .venv; then
        # Debian's own python3 ships venv (with pip) in a separate package.
        rm -rf .venv
        SUDO=""
        [ "$(id -u)" -eq 0 ] || SUDO="sudo"
        $SUDO apt-get update -qq
        DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq python3-venv
        "$PYTHON" -m venv .venv
    fi
fi
# Once pyproject.toml's dependencies are installed, say so in a stamp and skip pip next time:
# several run commands may start at once (a cluster's nodes) and pip must not race itself.
stamp=".venv/.installed-$(sha256sum pyproject.toml | cut -c1-16)${extras:+-test}"
if [ ! -e "$stamp" ] && { [ -n "$extras" ] || [ ! -e "${stamp}-test" ]; }; then
    .venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip
    .venv/bin/python -m pip install -q --disable-pip-version-check -e ".$extras"
    touch "$stamp"
fi

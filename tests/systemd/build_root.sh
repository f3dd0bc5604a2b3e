#!/usr/bin/env bash
# Build the Debian root that tests/test_systemd_unit.py boots with systemd-nspawn: a minimal
# bookworm with systemd, Python 3.11 and a venv at /opt/blastd/.venv (where the unit expects
# blastd) holding blastd's dependencies. It is a cached build artefact under .tmp/ (ignored by
# git). Each step leaves its marker last, so an interrupted step is redone.
set -euo pipefail
root=${1:?usage: build_root.sh ROOT REPO}
repo=${2:?usage: build_root.sh ROOT REPO}
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}

if [[ ! -e "$root/.blastd-root-ready" ]]; then
    if ! command -v debootstrap >/dev/null || ! command -v systemd-nspawn >/dev/null; then
        apt-get update -q
        apt-get install -y -q debootstrap systemd-container
    fi
    rm -rf "$root"
    mkdir -p "$(dirname "$root")"
    debootstrap --variant=minbase --include=systemd,systemd-sysv,dbus,python3,python3-venv \
        bookworm "$root" "$mirror"
    # Nothing in the container needs a console login or timers: a quick boot keeps tests short.
    chroot "$root" systemctl mask console-getty.service getty.target systemd-timesyncd.service \
        apt-daily.timer apt-daily-upgrade.timer systemd-logind.service
    touch "$root/.blastd-root-ready"
fi

if [[ ! -e "$root/opt/blastd/.venv-ready" ]]; then
    rm -rf "$root/opt/blastd/.venv"
    mkdir -p "$root/opt/blastd"
    chroot "$root" python3 -m venv /opt/blastd/.venv
    touch "$root/opt/blastd/.venv-ready"
fi

# pip resolves the dependencies for the container's own Python (bookworm's 3.11.2 needs
# async-timeout, a newer 3.11 does not). Redone when pyproject.toml changes. A TLS-inspecting
# proxy's CA (the host's PIP_CERT) is lent to pip, not added to the container's trust store.
deps=$(sha256sum "$repo/pyproject.toml" | cut -d' ' -f1)
if [[ "$(cat "$root/opt/blastd/.deps-ready" 2>/dev/null)" != "$deps" ]]; then
    rm -rf "$root/tmp/blastd-src"
    mkdir -p "$root/tmp/blastd-src"
    cp -r "$repo/pyproject.toml" "$repo/README.md" "$repo/blastd" "$root/tmp/blastd-src/"
    cert=()
    if [[ -n "${PIP_CERT:-}" ]]; then
        cp "$PIP_CERT" "$root/tmp/pip-ca.crt"
        cert=(PIP_CERT=/tmp/pip-ca.crt)  # the environment reaches the build-isolation pip too
    fi
    env -i PATH=/usr/bin:/bin HOME=/root "${cert[@]}" "$(command -v chroot)" "$root" \
        /opt/blastd/.venv/bin/pip install --quiet --disable-pip-version-check /tmp/blastd-src
    rm -rf "$root/tmp/blastd-src" "$root/tmp/pip-ca.crt"
    echo "$deps" > "$root/opt/blastd/.deps-ready"
fi

#!/usr/bin/env bash
# Installs what pachbackup's demo and tests need on a fresh Debian 12 machine with Node 20:
# PostgreSQL 15 (client and server), Ceph RGW and the peer S3 tools, then the npm dependencies.
# Used by the README's two commands and by .ci/run; safe to run again.
#
# PostgreSQL 15 is required. Ceph (radosgw) and the S3 client tools are optional: tests that need
# them skip with a message saying what to install, so a failed install is only a warning.
set -euo pipefail
cd "$(dirname "$0")/.."

export DEBIAN_FRONTEND=noninteractive
export CI=${CI:-true}

SUDO=()
if [ "$(id -u)" != 0 ]; then
  if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    SUDO=(sudo -n --preserve-env=DEBIAN_FRONTEND)
  else
    echo "WARNING: not root and no password-less sudo: skipping apt-get; the tools must already be installed" >&2
    SUDO=(false)
  fi
fi

# --no-upgrade: on a developer machine, leave installed versions alone (servers may be running).
apt_install() {
  "${SUDO[@]}" apt-get install -y -q --no-install-recommends --no-upgrade \
    -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold "$@" </dev/null
}

if [ "${SUDO[*]}" != false ]; then
  "${SUDO[@]}" apt-get update -q </dev/null

  # The package creates and may start a default cluster on port 5432; the tests never use it:
  # each starts its own server, in its own temp directory, on a free port.
  apt_install postgresql-15 postgresql-client-15

  # openssl: the CLI that makes the TLS tests' throw-away certificates (they skip without it).
  optional=(radosgw ceph-mon ceph-osd rclone awscli uuid-runtime curl openssl)
  if ! apt_install "${optional[@]}"; then
    # One unavailable package fails the whole transaction; get whatever can be had.
    for package in "${optional[@]}"; do
      apt_install "$package" || echo "WARNING: could not install $package; tests needing it will be skipped" >&2
    done
  fi
fi

if [ ! -x /usr/lib/postgresql/15/bin/initdb ]; then
  echo "ERROR: PostgreSQL 15 server binaries missing (/usr/lib/postgresql/15/bin/initdb)" >&2
  exit 1
fi
command -v radosgw >/dev/null 2>&1 || echo "WARNING: radosgw not installed: Ceph RGW tests will be skipped" >&2

echo "node $(node --version), npm $(npm --version)"
npm ci --no-audit --no-fund </dev/null

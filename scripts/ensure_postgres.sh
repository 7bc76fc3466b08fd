#!/usr/bin/env bash
# Print the folder of PostgreSQL's server binaries (initdb, pg_ctl, postgres), installing
# Debian's postgresql package first when they are missing.  The tests start a throwaway
# server from them (tests/postgres.py); the bot itself needs only a database URL.
set -euo pipefail

find_bin() {
  for dir in ${LOCALBOT_PG_BIN:-} /usr/lib/postgresql/*/bin; do
    if [ -x "$dir/initdb" ] && [ -x "$dir/pg_ctl" ] && [ -x "$dir/postgres" ]; then
      echo "$dir"; return 0
    fi
  done
  return 1
}

if find_bin; then exit 0; fi
echo "PostgreSQL server binaries not found: installing them with apt" >&2
SUDO=""
[ "$(id -u)" = 0 ] || SUDO="sudo"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq >&2
$SUDO apt-get install -y -qq postgresql >&2
find_bin

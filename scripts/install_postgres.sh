#!/usr/bin/env bash
# The distribution's PostgreSQL server programs (initdb, pg_ctl) for the shared-services tests and
# `histcode services up`; no cluster is created or started here. Nothing to do when they are there; apt-get as
# root, else through sudo.
set -euo pipefail
command -v initdb >/dev/null 2>&1 && exit 0
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 && exit 0
if [ "$(id -u)" = 0 ]; then apt=(apt-get); elif command -v sudo >/dev/null; then apt=(sudo apt-get); else
  echo "PostgreSQL is missing and this user cannot install it: run 'apt-get install postgresql' as root" >&2
  exit 0
fi
"${apt[@]}" install -y -q --no-install-recommends postgresql >/dev/null 2>&1 || { "${apt[@]}" update -q >/dev/null && "${apt[@]}" install -y -q --no-install-recommends postgresql >/dev/null; }
echo "installed $(ls /usr/lib/postgresql/*/bin/initdb)"

#!/usr/bin/env bash
# Installs schemathesis (pinned) into the Python venv ${TRIBUNAL_TOOLS_DIR:-target/tools}/venv,
# creating the venv if needed. Idempotent: does nothing when that version is already there.
# Used by scripts/schemathesis.sh and `make tools`. Needs python3 with the venv module.
set -euo pipefail
SCHEMATHESIS_VERSION=4.32.5

root=$(cd "$(dirname "$0")/.." && pwd)
tools=${TRIBUNAL_TOOLS_DIR:-$root/target/tools}
venv=$tools/venv

if [[ $("$venv/bin/schemathesis" --version 2>/dev/null) == "schemathesis, version $SCHEMATHESIS_VERSION" ]]; then
  exit 0
fi
echo "installing schemathesis $SCHEMATHESIS_VERSION into $venv" >&2
mkdir -p "$tools"
[[ -x $venv/bin/python ]] || python3 -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check "schemathesis==$SCHEMATHESIS_VERSION"
"$venv/bin/schemathesis" --version > /dev/null

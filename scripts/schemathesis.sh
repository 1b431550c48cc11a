#!/usr/bin/env bash
# Usage: scripts/schemathesis.sh BASE_URL      (e.g. http://127.0.0.1:8080)
# Property-based tests of a running Gateway against its own OpenAPI document
# ($BASE_URL/openapi.json, i.e. engine/openapi.json): no 5xx answer, and every answer's
# status code, content type and body conform to the document. Exits non-zero on any failure.
#
# Environment:
#   SCHEMATHESIS_MAX_EXAMPLES  test cases per operation in the fuzzing phase (default 25)
#   SCHEMATHESIS_SEED          random seed (default 1)
#   TRIBUNAL_ADMIN_TOKEN       when set, the admin operations are tested too, with this
#                              bearer token; otherwise they are excluded. They inject
#                              faults and activate random versions (a version the binary
#                              lacks halts every instance): use a throw-away cluster
#   TRIBUNAL_TOOLS_DIR         where the venv lives (default target/tools)
set -euo pipefail

if [[ $# -ne 1 || -z $1 ]]; then
  echo "usage: $0 BASE_URL" >&2
  exit 2
fi
base_url=${1%/}
root=$(cd "$(dirname "$0")/.." && pwd)
"$root/scripts/install-schemathesis.sh"
tools=$(cd "${TRIBUNAL_TOOLS_DIR:-$root/target/tools}" && pwd)
max_examples=${SCHEMATHESIS_MAX_EXAMPLES:-25}
seed=${SCHEMATHESIS_SEED:-1}

args=(
  run "$base_url/openapi.json"
  --url "$base_url"
  --checks not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance
  --phases examples,coverage,fuzzing
  --max-examples "$max_examples"
  --seed "$seed"
  --workers 1
  --request-timeout 15
  --generation-database none
  --no-color
)
if [[ -n ${TRIBUNAL_ADMIN_TOKEN:-} ]]; then
  args+=(-H "Authorization: Bearer $TRIBUNAL_ADMIN_TOKEN")
  admin=included
  echo "schemathesis.sh: admin operations included: random versions are activated (an unknown one halts" \
    "every instance) and faults are injected; use a throw-away cluster" >&2
else
  args+=(--exclude-tag admin)
  admin=excluded
fi

# Run from the tools directory: nothing schemathesis or hypothesis may write lands in the tree.
log=$tools/schemathesis.log
rc=0
(cd "$tools" && "$tools/venv/bin/schemathesis" "${args[@]}") 2>&1 | tee "$log" || rc=$?
last=$(grep -v '^[[:space:]]*$' "$log" | tail -n 1 | sed 's/^[=[:space:]]*//; s/[=[:space:]]*$//')
if [[ $rc -eq 0 ]]; then verdict=PASS; else verdict=FAIL; fi
echo "schemathesis $verdict (exit $rc): $base_url, seed $seed, max examples $max_examples, admin $admin: ${last:-no output}"
exit "$rc"

#!/usr/bin/env bash
# The contract run: Schemathesis against the runner, once per role, then every documented 4xx
# checked as observed (contract/coverage.py). The runner serves a fresh database of its own
# with its own roles, on a free loopback port, and everything is removed at the end.
#
#   contract/run.sh            (needs TEST_DATABASE_URL, a server URL, and target/debug/tally)
#
# Settings: MAX_EXAMPLES (30), TALLY_BIN (target/debug/tally).
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)
server=${TEST_DATABASE_URL:?set TEST_DATABASE_URL to a PostgreSQL server URL (postgres://user@host:port/db)}
bin=${TALLY_BIN:-target/debug/tally}
examples=${MAX_EXAMPLES:-30}
run="contract_$$_$(date +%s)"
db="tally_$run"
roles=("tally_${run}_app" "tally_${run}_ro")
work=$(mktemp -d "/tmp/tally-$run.XXXXXX")
# The server URL with this run's database in place of its own (its query string kept).
db_url=$(python3 -c 'import sys, urllib.parse as u; p = u.urlsplit(sys.argv[1]); print(u.urlunsplit(p._replace(path="/" + sys.argv[2])))' "$server" "$db")
command -v st >/dev/null || { echo "Schemathesis (st) is not installed: pip install schemathesis==4.32.5"; exit 1; }
runner_pid=

cleanup() {
  set +e
  if [ -n "$runner_pid" ]; then kill "$runner_pid" 2>/dev/null; wait "$runner_pid" 2>/dev/null; fi
  psql "$server" -qX -c "DROP DATABASE IF EXISTS $db WITH (FORCE)" \
    -c "DROP ROLE IF EXISTS ${roles[0]}" -c "DROP ROLE IF EXISTS ${roles[1]}" >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT

psql "$server" -qX -c "CREATE DATABASE $db" >/dev/null
# A secret of this run's own: the tokens below are signed with it and die with the run.
JWT_HS256_SECRET=$(python3 -c 'import secrets; print(secrets.token_urlsafe(48))')
export JWT_HS256_SECRET
# A free port, found by binding and releasing it; another process may take it first, so a
# runner that exits at once is started again on another.
for attempt in 1 2 3; do
  port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  DATABASE_URL="$db_url" PORT="$port" METRICS_PORT=0 LOG_LEVEL=warn \
    APP_DB_ROLE="${roles[0]}" READONLY_DB_ROLE="${roles[1]}" \
    "$bin" >"$work/runner.log" 2>&1 &
  runner_pid=$!
  base="http://127.0.0.1:$port"
  for _ in $(seq 1 100); do
    curl -fsS "$base/healthz" >/dev/null 2>&1 && break
    kill -0 "$runner_pid" 2>/dev/null || break
    sleep 0.2
  done
  curl -fsS "$base/healthz" >/dev/null 2>&1 && break
  cat "$work/runner.log"
  kill "$runner_pid" 2>/dev/null; wait "$runner_pid" 2>/dev/null || true
  runner_pid=
  [ "$attempt" = 3 ] && { echo "the runner did not come up"; exit 1; }
done

customer=$("$bin" token --sub 1 --role customer --ttl 1h)
admin=$("$bin" token --sub 2 --role admin --ttl 1h)
status=0
for role in customer admin; do
  token=${!role}
  echo "== Schemathesis as $role: every phase (examples, coverage, fuzzing, stateful), $examples examples per operation"
  # Every check, a fixed seed so a failure replays; stateful follows the document's links (an
  # order's GET and cancel, a product's GET, PATCH and restock) from what POST made. One
  # worker: Hypothesis parses source with `ast` while it builds strategies, and CPython 3.11's
  # parser is not safe across threads (it fails with "AST constructor recursion depth").
  # From the run's own directory, so Hypothesis' and Schemathesis' caches go with it.
  (cd "$work" && st --config-file "$repo/contract/schemathesis.toml" run "$base/openapi.json" \
    --header "Authorization: Bearer $token" \
    --checks all --max-examples "$examples" --workers 1 --seed 20261126 \
    --report vcr --report-vcr-path "$work/$role.yaml") || status=1
done
kill "$runner_pid"; wait "$runner_pid" 2>/dev/null || true
runner_pid=
# The runner logs one JSON object per line; an ERROR one is a bug Schemathesis did not see.
if grep -q '"level":"ERROR"' "$work/runner.log"; then
  echo "the runner logged errors:"; grep '"level":"ERROR"' "$work/runner.log" | head -20; status=1
fi
python3 contract/coverage.py shared/openapi.json "$work/customer.yaml" "$work/admin.yaml" || status=1
exit "$status"

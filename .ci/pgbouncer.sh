#!/usr/bin/env bash
# The request paths through a real PgBouncer in transaction mode (what DigitalOcean's connection
# pools and CloudNativePG's Pooler are): a PgBouncer on a free loopback port in front of the
# tests' server, and the tests that storm, retry, process and fault run with every function's
# connections going through it (TEST_POOLER_URL; runner/tests/api/helpers.rs). Migrations,
# seeding and the tests' own checks connect directly, as migrate and backup do in production.
# Exact counts, as in the plain run. Not part of the README's `cargo test`.
#
#   TEST_DATABASE_URL=postgres://postgres@127.0.0.1:5432/postgres bash .ci/pgbouncer.sh
set -euo pipefail
# Its files hold a password: nobody else reads them.
umask 077
cd "$(dirname "$0")/.."
: "${TEST_DATABASE_URL:?the tests server, e.g. postgres://postgres@127.0.0.1:5432/postgres}"
if ! command -v pgbouncer >/dev/null 2>&1 && [ ! -x /usr/sbin/pgbouncer ]; then
  timeout 600 apt-get update -qq
  DEBIAN_FRONTEND=noninteractive timeout 900 apt-get install -y -qq --no-install-recommends pgbouncer
fi
bouncer=$(command -v pgbouncer || echo /usr/sbin/pgbouncer)
"$bouncer" --version | head -1

# The server behind it: host and port of TEST_DATABASE_URL.
authority=${TEST_DATABASE_URL#*://}
case "$authority" in *@*) authority=${authority#*@} ;; esac
authority=${authority%%[/?]*}
server_host=${authority%:*}
server_port=5432
case "$authority" in *:*) server_port=${authority##*:} ;; esac
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
dir=$(mktemp -d /tmp/tally-pgbouncer.XXXXXX)
chmod 711 "$dir"
cleanup() {
  [ -f "$dir/pgbouncer.pid" ] && kill "$(cat "$dir/pgbouncer.pid")" 2>/dev/null || true
  rm -rf "$dir"
}
trap cleanup EXIT

# Clients authenticate with SCRAM against the secrets the server keeps (auth_query, as the
# superuser the tests already use); PgBouncer then logs in to the server as them.
# The auth user's password here only opens PgBouncer's admin console (SHOW TOTALS below).
admin_password=$(python3 -c 'import secrets; print(secrets.token_hex(16))')
cat > "$dir/userlist.txt" <<USERS
"postgres" "$admin_password"
USERS
cat > "$dir/pgbouncer.ini" <<INI
[databases]
* = host=$server_host port=$server_port
[pgbouncer]
listen_addr = 127.0.0.1
listen_port = $port
unix_socket_dir =
auth_type = scram-sha-256
auth_file = $dir/userlist.txt
auth_user = postgres
auth_query = SELECT usename, passwd FROM pg_shadow WHERE usename = \$1
pool_mode = transaction
max_client_conn = 2000
; The tests' databases are many and short-lived, and the server's connections are shared with
; the tests' direct ones: few server connections per pool and per user, given back quickly.
default_pool_size = 10
max_user_connections = 30
server_idle_timeout = 2
admin_users = postgres
server_reset_query =
logfile = $dir/pgbouncer.log
pidfile = $dir/pgbouncer.pid
[users]
postgres = max_user_connections=5
INI
as_user=()
if [ "$(id -u)" = 0 ]; then
  # PgBouncer refuses to run as root.
  chown -R postgres "$dir"
  chmod 600 "$dir/userlist.txt"
  as_user=(runuser -u postgres --)
fi
timeout 30 "${as_user[@]}" "$bouncer" -d "$dir/pgbouncer.ini"
ready=
for _ in $(seq 100); do
  if PGPASSWORD=$admin_password psql "postgres://postgres@127.0.0.1:$port/postgres" -qAtc "SELECT 1" >/dev/null 2>&1; then
    ready=yes
    break
  fi
  sleep 0.1
done
if [ -z "$ready" ]; then
  echo "PgBouncer did not answer on 127.0.0.1:$port within 10 s"
  tail -20 "$dir/pgbouncer.log" || true
  exit 1
fi
echo "PgBouncer on 127.0.0.1:$port, transaction mode, in front of $server_host:$server_port"

export TEST_POOLER_URL="postgres://127.0.0.1:$port"
# storms: concurrent orders with exact counts; keyed_writes and orders: Idempotency-Key;
# processor and events: claims, confirmations, redelivery; faults: SIGTERM and a database that
# goes away (those on a private cluster of their own connect to it directly).
# Arguments, when given, replace that list (e.g. `bash .ci/pgbouncer.sh storms::`).
filters=("$@")
[ ${#filters[@]} -gt 0 ] || filters=(storms:: keyed_writes:: orders:: processor:: events:: faults::)
status=0
timeout 1500 cargo test -p tally --test api -- "${filters[@]}" || status=$?
if [ "$status" != 0 ]; then
  echo "--- pgbouncer.log: warnings and errors (the last 60)"
  grep -E "WARNING|ERROR|FATAL" "$dir/pgbouncer.log" | grep -v "when not linked" | tail -60 || true
fi
# And the functions' traffic did go through it (a URL the harness failed to rewrite would have
# gone straight to the server and proved nothing).
transactions=$(PGPASSWORD=$admin_password psql "postgres://postgres@127.0.0.1:$port/pgbouncer" -qAtX -F ' ' -c 'SHOW TOTALS' \
  | awk '$1 == "xact_count" || $1 == "total_xact_count" { print $2 }' | head -1)
echo "PgBouncer served ${transactions:-0} transactions"
if [ "$status" = 0 ] && [ "${transactions:-0}" -lt 1000 ]; then
  echo "fewer than 1,000 transactions went through PgBouncer: the tests did not use it"
  status=1
fi
exit "$status"

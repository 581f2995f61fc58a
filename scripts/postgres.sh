#!/usr/bin/env bash
# A throwaway PostgreSQL server for tests and CI, listening on 127.0.0.1 only.
#   scripts/postgres.sh start    start it (creating it on first use) and print its URL
#   scripts/postgres.sh url      print the URL (SQLAlchemy form, for CBAM_NAS_DATABASE_URL)
#   scripts/postgres.sh status   exit 0 when it accepts connections
#   scripts/postgres.sh stop     stop it and delete its data
#   scripts/postgres.sh halt     stop it, keeping its data (`start` brings it back as it was)
# e.g. export CBAM_NAS_DATABASE_URL=$(scripts/postgres.sh start)
# Needs Debian's server package: apt-get update && apt-get install -y postgresql
# Works as root (the server then runs as the postgres user, since initdb refuses root) and as
# any other user (the server runs as that user).
# Env: PGTMP (data dir parent, default /tmp/cbam-nas-pg-$UID), PGPORT_CI (default 55432),
#      PG_AUTH_HOST (trust | scram-sha-256, default trust). fsync is off: for tests only.
set -euo pipefail
PGTMP=${PGTMP:-/tmp/cbam-nas-pg-$(id -u)}
PORT=${PGPORT_CI:-55432}
DATA=$PGTMP/data
URL="postgresql+psycopg://app:app@127.0.0.1:$PORT/appdb"

pgbin() {
  local dir
  dir=$(find /usr/lib/postgresql -mindepth 2 -maxdepth 2 -name bin -type d 2>/dev/null | sort -V | tail -1)
  if [ -z "$dir" ]; then
    echo "postgres.sh: no PostgreSQL server found; apt-get install -y postgresql" >&2
    exit 1
  fi
  echo "$dir"
}

RUNAS=()
if [ "$(id -u)" = 0 ]; then RUNAS=(runuser -u postgres --); fi

case "${1:-start}" in
start)
  PGBIN=$(pgbin)
  mkdir -p "$PGTMP"
  if [ "$(id -u)" = 0 ]; then chown postgres:postgres "$PGTMP"; fi
  if [ ! -s "$DATA/PG_VERSION" ]; then
    "${RUNAS[@]}" "$PGBIN/initdb" -D "$DATA" -U postgres --auth-local=trust \
      --auth-host="${PG_AUTH_HOST:-trust}" -E UTF8 --locale=C.UTF-8 --no-sync >"$PGTMP/initdb.log"
  fi
  if ! "$PGBIN/pg_isready" -q -h 127.0.0.1 -p "$PORT"; then
    "${RUNAS[@]}" "$PGBIN/pg_ctl" -D "$DATA" -l "$PGTMP/server.log" -w -t 30 \
      -o "-c listen_addresses=127.0.0.1 -p $PORT -k $PGTMP -c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=200" \
      start >/dev/null || { cat "$PGTMP/server.log" >&2; exit 1; }
  fi
  # The role and database exist already on a restart; that error is expected then.
  "${RUNAS[@]}" "$PGBIN/psql" -h "$PGTMP" -p "$PORT" -U postgres -v ON_ERROR_STOP=1 -qc \
    "CREATE ROLE app LOGIN CREATEDB PASSWORD 'app';" -c "CREATE DATABASE appdb OWNER app;" \
    >/dev/null 2>&1 || true
  # Tests drop their databases WITH (FORCE), which must end autovacuum workers in them too.
  "${RUNAS[@]}" "$PGBIN/psql" -h "$PGTMP" -p "$PORT" -U postgres -qc \
    "GRANT pg_signal_backend TO app;" >/dev/null 2>&1 || true
  echo "$URL"
  ;;
url) echo "$URL" ;;
status) "$(pgbin)/pg_isready" -h 127.0.0.1 -p "$PORT" ;;
halt)
  PGBIN=$(pgbin)
  "${RUNAS[@]}" "$PGBIN/pg_ctl" -D "$DATA" -m fast -w stop >/dev/null
  ;;
stop)
  PGBIN=$(pgbin)
  if [ -d "$DATA" ]; then
    "${RUNAS[@]}" "$PGBIN/pg_ctl" -D "$DATA" -m fast -w stop >/dev/null 2>&1 || true
  fi
  rm -rf "$PGTMP"
  ;;
*) echo "usage: $0 start|url|status|halt|stop" >&2; exit 2 ;;
esac

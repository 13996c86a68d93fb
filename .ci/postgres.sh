#!/usr/bin/env bash
# A throwaway PostgreSQL server on 127.0.0.1 for the shared-study test.
#   postgres.sh start       prints "URL DATA_DIR" when this machine can run one (installing
#                           Debian's package if needed), nothing otherwise (the test then skips)
#   postgres.sh stop DIR    stops it and removes DIR
set -u
bin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)
user=$(id -un)
[ "$(id -u)" = 0 ] && user=postgres  # the server refuses to run as root
as_user() {
  if [ "$user" = "$(id -un)" ]; then "$@"; else su -s /bin/sh "$user" -c "$(printf '%q ' "$@")"; fi
}

if [ "${1:-}" = stop ]; then
  [ -n "$bin" ] && as_user "$bin/pg_ctl" -D "$2/db" -m fast stop >/dev/null 2>&1
  rm -rf "$2"
  exit 0
fi

port=${LOOPTUNE_PG_PORT:-54329}
if [ -z "$bin" ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  apt-get install -y -q postgresql >/dev/null 2>&1 ||
    { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q postgresql >/dev/null 2>&1; }
  bin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)
fi
[ -n "$bin" ] || exit 0
if [ "$user" = postgres ]; then
  id postgres >/dev/null 2>&1 || useradd -r -M postgres >/dev/null 2>&1 || exit 0
fi
data=$(mktemp -d /tmp/looptune-pg.XXXXXX)
chown "$user" "$data" 2>/dev/null
as_user "$bin/initdb" -D "$data/db" -U looptune --auth=trust >/dev/null 2>&1 || exit 0
as_user "$bin/pg_ctl" -D "$data/db" -l "$data/log" -w \
  -o "-p $port -k $data -c listen_addresses=127.0.0.1" start >/dev/null 2>&1 || exit 0
as_user "$bin/createdb" -h 127.0.0.1 -p "$port" -U looptune looptune_test >/dev/null 2>&1 || exit 0
echo "postgresql://looptune@127.0.0.1:$port/looptune_test $data"

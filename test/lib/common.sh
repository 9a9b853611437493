# test/lib/common.sh: shared by test/run-all and demo/run.
#
# Sets a fresh Debian 12 machine up (packages, build, install), and starts
# and stops a throwaway PostgreSQL cluster as a non-root user (PostgreSQL
# refuses to run as root, and CI runs as root).

PG_BIN=${D365INV_PG_BIN:-/usr/lib/postgresql/15/bin}   # test/run-all sets it for the cassert leg
TEST_USER=${D365INV_TEST_USER:-d365inv_test}

# Debian packages the build, the tests and the demo need
D365INV_PACKAGES="make gcc clang bc libclang-rt-14-dev postgresql-15 postgresql-server-dev-15
    curl libcurl4-openssl-dev libcjson-dev libipc-run-perl python3 python3-pytest python3-psycopg2"

log() { printf '==> %s\n' "$*" >&2; }

as_root() {
    if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi
}

# ensure_packages [PACKAGE...]: install the missing ones (default: $D365INV_PACKAGES)
ensure_packages() {
    local missing=() p
    for p in ${*:-$D365INV_PACKAGES}; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
    done
    if [ ${#missing[@]} -gt 0 ]; then
        log "installing Debian packages: ${missing[*]}"
        as_root apt-get update -qq
        as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    fi
}

# Build warning-free (-Werror on top of -Wall -Wextra) and install.
build_and_install() {
    log "building d365inv (-Wall -Wextra -Werror)"
    make -s clean >/dev/null
    make -s COPT=-Werror >/dev/null
    as_root make -s install >/dev/null
}

# Run "$@" as the non-root test user in a copy of the tree it owns, with
# $PG_BIN first in PATH.  Sets RUN_DIR to that copy.
run_unprivileged() {
    RUN_DIR=$(mktemp -d /tmp/d365inv-run.XXXXXX)
    tar --exclude=.git --exclude='*.o' --exclude='*.so' --exclude='*.bc' -cf - . | tar -C "$RUN_DIR" -xf -
    chmod 755 "$RUN_DIR"
    if [ "$(id -u)" = 0 ]; then
        id "$TEST_USER" >/dev/null 2>&1 || useradd --system --create-home --shell /bin/bash "$TEST_USER"
        chown -R "$TEST_USER" "$RUN_DIR"
        (cd "$RUN_DIR" && runuser -u "$TEST_USER" -- env PATH="$PG_BIN:/usr/local/bin:/usr/bin:/bin" HOME="$RUN_DIR" "$@")
    else
        (cd "$RUN_DIR" && PATH="$PG_BIN:$PATH" "$@")
    fi
}

# cluster_start DIR [extra postgresql.conf lines...]
# A throwaway cluster in DIR, listening only on a Unix socket in DIR.
# Exports PGHOST, PGPORT, PGDATA, PGUSER for psql, pg_regress and the tests.
cluster_start() {
    local dir=$1; shift
    export PGDATA=$dir/data PGHOST=$dir PGPORT=5432 PGUSER=postgres
    "$PG_BIN/initdb" -D "$PGDATA" -U postgres --auth=trust --encoding=UTF8 --locale=C.UTF-8 >"$dir/initdb.log" 2>&1 \
        || { cat "$dir/initdb.log"; return 1; }
    cat >>"$PGDATA/postgresql.conf" <<CONF
listen_addresses = ''
unix_socket_directories = '$dir'
port = $PGPORT
shared_preload_libraries = 'd365inv'
fsync = off
max_worker_processes = 16
log_min_messages = info
log_line_prefix = '%m [%p] %b '
CONF
    local line
    for line in "$@"; do echo "$line" >>"$PGDATA/postgresql.conf"; done
    "$PG_BIN/pg_ctl" -D "$PGDATA" -l "$dir/server.log" -w -t 60 start >/dev/null \
        || { tail -30 "$dir/server.log"; return 1; }
}

cluster_stop() {
    [ -n "${PGDATA:-}" ] && [ -f "$PGDATA/postmaster.pid" ] && \
        "$PG_BIN/pg_ctl" -D "$PGDATA" -m fast -w stop >/dev/null 2>&1
    return 0
}

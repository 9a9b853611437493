# test/lib/cassert.sh: an assert-enabled PostgreSQL 15 for test/run-all's
# "cassert" leg.  Sourced after test/lib/common.sh.
#
# ensure_cassert_pg builds PostgreSQL 15 from the Debian source package's
# upstream tarball with --enable-cassert --enable-debug (assertions on, and
# freed memory clobbered with 0x7F, so a read after pfree/SPI_finish shows)
# into $CASSERT_PREFIX, once: it does nothing when the stamp file there
# records the same source version and build flags.  To get the source it adds
# a deb-src entry for the main Debian suite (only if there is none yet).
# cassert_build_extension builds and installs d365inv against that server
# from a scratch copy of the tree.

CASSERT_PREFIX=${D365INV_CASSERT_PREFIX:-/var/cache/d365inv/pg15-cassert}
CASSERT_STAMP=$CASSERT_PREFIX/.d365inv-stamp
CASSERT_SRC_PACKAGE=postgresql-15
CASSERT_SRC_LIST=/etc/apt/sources.list.d/d365inv-src.sources
CASSERT_CONFIGURE="--enable-cassert --enable-debug --without-icu --with-zlib --with-readline"
CASSERT_CFLAGS="-O1 -g -fno-omit-frame-pointer"
# what the PostgreSQL build needs on top of D365INV_PACKAGES
CASSERT_PACKAGES="dpkg-dev make gcc bison flex perl zlib1g-dev libreadline-dev bzip2 xz-utils"

# the codename of the installed Debian release (bookworm)
cassert_codename() {
    (. /etc/os-release && echo "${VERSION_CODENAME:-}")
}

# The highest source version of $CASSERT_SRC_PACKAGE apt knows (empty if no deb-src).
cassert_src_version() {
    local v best=
    for v in $(apt-cache showsrc --only-source "$CASSERT_SRC_PACKAGE" 2>/dev/null | awk '$1 == "Version:" {print $2}'); do
        if [ -z "$best" ] || dpkg --compare-versions "$v" gt "$best"; then best=$v; fi
    done
    echo "$best"
}

# Print the URIs, Components and Signed-By of the first enabled deb822 stanza
# (in FILES) whose Types include "deb" and whose Suites include SUITE, one
# "Key: value" line each.
cassert_deb822_main() {
    local suite=$1; shift
    awk -v suite="$suite" -v want=deb '
        function flush() {
            if (!found && enabled && has(types, want) && has(suites, suite)) {
                print "URIs: " uris; print "Components: " comps
                if (signed != "") print "Signed-By: " signed
                found = 1
            }
            types = suites = uris = comps = signed = ""; enabled = 1
        }
        function has(list, w,   n, a, i) {
            n = split(list, a, /[ \t]+/)
            for (i = 1; i <= n; i++) if (a[i] == w) return 1
            return 0
        }
        BEGIN { enabled = 1 }
        FNR == 1 { flush() }
        /^[ \t]*#/ { next }
        /^[ \t]*$/ { flush(); next }
        {
            key = $0; sub(/:.*/, "", key); val = $0; sub(/^[^:]*:[ \t]*/, "", val)
            if (key == "Types") types = val
            else if (key == "Suites") suites = val
            else if (key == "URIs") uris = val
            else if (key == "Components") comps = val
            else if (key == "Signed-By") signed = val
            else if (key == "Enabled" && val == "no") enabled = 0
        }
        END { flush() }' "$@"
}

# Add a deb-src entry for the main Debian suite, unless apt has one already.
cassert_add_deb_src() {
    local suite sources lists entry line
    suite=$(cassert_codename)
    [ -n "$suite" ] || { log "cassert: no VERSION_CODENAME in /etc/os-release"; return 1; }
    sources=$(ls /etc/apt/sources.list.d/*.sources 2>/dev/null || true)
    lists=$(ls /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null || true)
    # already there?
    if [ -n "$sources" ] && [ -n "$(cassert_deb822_src_present "$suite" $sources)" ]; then return 0; fi
    if [ -n "$lists" ] && grep -hqE "^[[:space:]]*deb-src[[:space:]].*[[:space:]]$suite[[:space:]]" $lists; then return 0; fi
    entry=
    if [ -n "$sources" ]; then
        entry=$(cassert_deb822_main "$suite" $sources)
    fi
    if [ -n "$entry" ]; then
        log "cassert: adding $CASSERT_SRC_LIST (deb-src for $suite)"
        printf 'Types: deb-src\nSuites: %s\n%s\n' "$suite" "$entry" | as_root tee "$CASSERT_SRC_LIST" >/dev/null
        return 0
    fi
    # one-line format: copy the first "deb URI SUITE COMPONENTS" line
    if [ -n "$lists" ]; then
        line=$(grep -hE "^[[:space:]]*deb[[:space:]]+(\[[^]]*\][[:space:]]+)?[^[:space:]]+[[:space:]]+$suite[[:space:]]" $lists | head -1)
        if [ -n "$line" ]; then
            log "cassert: adding ${CASSERT_SRC_LIST%.sources}.list (deb-src for $suite)"
            printf '%s\n' "$line" | sed -E 's/^[[:space:]]*deb[[:space:]]/deb-src /' \
                | as_root tee "${CASSERT_SRC_LIST%.sources}.list" >/dev/null
            return 0
        fi
    fi
    log "cassert: found no apt entry for suite $suite to copy into a deb-src entry"
    return 1
}

# non-empty output if FILES have an enabled deb-src stanza for SUITE
cassert_deb822_src_present() {
    local suite=$1; shift
    awk -v suite="$suite" '
        function flush() {
            if (enabled && has(types, "deb-src") && has(suites, suite)) found = 1
            types = suites = ""; enabled = 1
        }
        function has(list, w,   n, a, i) {
            n = split(list, a, /[ \t]+/)
            for (i = 1; i <= n; i++) if (a[i] == w) return 1
            return 0
        }
        BEGIN { enabled = 1 }
        FNR == 1 { flush() }
        /^[ \t]*#/ { next }
        /^[ \t]*$/ { flush(); next }
        {
            key = $0; sub(/:.*/, "", key); val = $0; sub(/^[^:]*:[ \t]*/, "", val)
            if (key == "Types") types = val
            else if (key == "Suites") suites = val
            else if (key == "Enabled" && val == "no") enabled = 0
        }
        END { flush(); if (found) print "yes" }' "$@"
}

cassert_stamp_text() {
    printf 'source %s %s\nconfigure %s\nCFLAGS %s\n' "$CASSERT_SRC_PACKAGE" "$1" "$CASSERT_CONFIGURE" "$CASSERT_CFLAGS"
}

# Build PostgreSQL 15 with assertions into $CASSERT_PREFIX unless the stamp
# says it is there already.  Returns non-zero (after logging why) on failure.
ensure_cassert_pg() {
    local want work tarball start rc
    case $CASSERT_PREFIX in
    /?*/?*) ;;
    *) log "cassert: refusing to build into '$CASSERT_PREFIX'"; return 1 ;;
    esac
    want=$(cassert_src_version)
    if [ -n "$want" ] && [ -x "$CASSERT_PREFIX/bin/postgres" ] && [ -f "$CASSERT_STAMP" ] \
       && [ "$(cat "$CASSERT_STAMP")" = "$(cassert_stamp_text "$want")" ]; then
        log "cassert: using the PostgreSQL $want build in $CASSERT_PREFIX"
        return 0
    fi
    start=$SECONDS
    ensure_packages $CASSERT_PACKAGES || return 1
    cassert_add_deb_src || return 1
    as_root apt-get update -qq || { log "cassert: apt-get update failed"; return 1; }
    want=$(cassert_src_version)
    [ -n "$want" ] || { log "cassert: apt knows no source package $CASSERT_SRC_PACKAGE"; return 1; }
    if [ -x "$CASSERT_PREFIX/bin/postgres" ] && [ -f "$CASSERT_STAMP" ] \
       && [ "$(cat "$CASSERT_STAMP")" = "$(cassert_stamp_text "$want")" ]; then
        log "cassert: using the PostgreSQL $want build in $CASSERT_PREFIX"
        return 0
    fi
    log "cassert: building PostgreSQL $want (--enable-cassert --enable-debug) into $CASSERT_PREFIX; this takes a while"
    work=$(mktemp -d /tmp/d365inv-cassert-build.XXXXXX)
    chmod 755 "$work"    # apt-get source downloads as _apt when it can
    rc=0
    (
        cd "$work" || exit 1
        apt-get source -qq --download-only "$CASSERT_SRC_PACKAGE=$want" >apt-source.log 2>&1 \
            || { cat apt-source.log; echo "cassert: apt-get source $CASSERT_SRC_PACKAGE=$want failed"; exit 1; }
        tarball=$(ls ./*.orig.tar.* 2>/dev/null | head -1)
        [ -n "$tarball" ] || { ls -l; echo "cassert: no upstream tarball downloaded"; exit 1; }
        mkdir src && tar -C src --strip-components=1 -xf "$tarball" || exit 1
        cd src || exit 1
        ./configure -q --prefix="$CASSERT_PREFIX" $CASSERT_CONFIGURE CFLAGS="$CASSERT_CFLAGS" \
            >../configure.log 2>&1 || { tail -40 ../configure.log config.log; exit 1; }
        make -s -j"$(nproc)" >../make.log 2>&1 || { tail -60 ../make.log; exit 1; }
        # pg_regress for PGXS's installcheck comes with "make install" (src/test/regress)
        as_root rm -rf "$CASSERT_PREFIX" || exit 1
        as_root make -s install >../install.log 2>&1 || { tail -40 ../install.log; exit 1; }
        cassert_stamp_text "$want" | as_root tee "$CASSERT_STAMP" >/dev/null || exit 1
    ) >&2 || rc=1
    rm -rf "$work"
    if [ $rc != 0 ]; then log "cassert: building PostgreSQL failed"; return 1; fi
    "$CASSERT_PREFIX/bin/postgres" --version >&2
    log "cassert: PostgreSQL $want built in $((SECONDS - start)) s"
}

# Build d365inv against the assert-enabled server from a scratch copy of the
# tree (the normal build stays untouched) and install it there.
cassert_build_extension() {
    local dir rc=0
    dir=$(mktemp -d /tmp/d365inv-cassert-ext.XXXXXX)
    tar --exclude=.git --exclude='*.o' --exclude='*.so' --exclude='*.bc' -cf - . | tar -C "$dir" -xf -
    log "cassert: building d365inv against $CASSERT_PREFIX (-Werror)"
    (
        cd "$dir" || exit 1
        make -s PG_CONFIG="$CASSERT_PREFIX/bin/pg_config" COPT=-Werror >/dev/null || exit 1
        as_root make -s install PG_CONFIG="$CASSERT_PREFIX/bin/pg_config" >/dev/null || exit 1
    ) || rc=1
    rm -rf "$dir"
    return $rc
}

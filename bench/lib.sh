# bench/lib.sh: sourced (after test/lib/common.sh) by the benchmarks' shell
# wrappers and by benchmarks written in shell, from the top of the tree.
#
#   bench_result NAME < table.md
#       the markdown of a benchmark's figures -- a table of ratios to a
#       baseline measured in the same run, and a line saying what was
#       measured -- as bench/results/NAME.md (bench/benchlib.py result NAME);
#       bench/update-docs puts it between the <!-- bench:NAME --> and
#       <!-- /bench:NAME --> markers of docs/benchmarks.md.  A benchmark
#       writes it only for a run with its default settings.
#   bench_collect NAME
#       in a wrapper, after run_unprivileged: brings bench/out/NAME-* and a
#       changed bench/results/NAME.md back from the copy in $RUN_DIR, puts
#       the new table into the docs (bench/update-docs NAME), and removes
#       $RUN_DIR.

BENCH_LIB_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

bench_result() {
    /usr/bin/python3 "$BENCH_LIB_DIR/benchlib.py" result "$1"
}

bench_collect() {
    local name=$1 new="$RUN_DIR/bench/results/$1.md"
    mkdir -p bench/out
    cp -n "$RUN_DIR"/bench/out/"$name"-* bench/out/ 2>/dev/null || true
    if [ -f "$new" ] && ! cmp -s "$new" "bench/results/$name.md"; then
        mkdir -p bench/results
        cp "$new" "bench/results/$name.md"
        log "bench/results/$name.md has the new figures"
        /usr/bin/python3 bench/update-docs "$name" || true
    fi
    rm -rf "$RUN_DIR"
}

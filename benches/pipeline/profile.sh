#!/usr/bin/env bash
# Profiles one vidu-worker process during the instant-throughput scenario of
# the pipeline benchmark and prints where its CPU time goes.
#
#   benches/pipeline/profile.sh [OUTPUT.perf.data]
#
# Needs `perf` (Debian: apt-get install linux-perf). Builds the bench with
# line-table debug info in its own target directory (target/profiling), so
# the normal release build is left alone. Extra knobs: BENCH_SCALE,
# BENCH_PERF_ARGS (default: -e cpu-clock -F 250 --call-graph dwarf,16384)
# and any VIDU_WORKER__* variable, as for `cargo bench --bench pipeline`.
set -euo pipefail
cd "$(dirname "$0")/../.."

if ! command -v perf >/dev/null 2>&1; then
    echo "perf is not installed (Debian: apt-get install linux-perf)" >&2
    exit 1
fi
out="${1:-target/profiling/worker.perf.data}"
mkdir -p "$(dirname "$out")"
out="$(cd "$(dirname "$out")" && pwd)/$(basename "$out")"

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-target/profiling}"
export CARGO_PROFILE_BENCH_DEBUG="${CARGO_PROFILE_BENCH_DEBUG:-line-tables-only}"
BENCH_ONLY=throughput BENCH_PERF="$out" cargo bench --bench pipeline

report() {
    perf report -i "$out" --stdio --sort "$1" "${@:2}" 2>/dev/null | grep -v '^#' | grep -v '^$'
}
echo
echo "== CPU by thread"
report comm --no-children -g none | head -8
echo
echo "== CPU by library"
report dso --no-children -g none | head -8
echo
echo "== Hottest functions (self time)"
report symbol --no-children -g none --percent-limit 1 | cut -c1-160 | head -25
echo
echo "== vidu_worker functions and notable callees (inclusive time)"
report symbol --children -g none --percent-limit 0.5 |
    grep -E '\[\.\] (<?vidu_worker::|serde_json::de::from_|<tracing_subscriber::fmt::fmt_layer|url::parser::Parser::parse_url|lapin::io_loop::IoLoop|hyper::proto::h1::dispatch::Dispatcher|_int_malloc|__memmove)' |
    cut -c1-160 | head -40
echo
echo "perf data: $out (perf report -i \"$out\" for the full call graph)"

#!/usr/bin/env bash
# Build benchmark (issue 4). Prints a table: cold build, no-op build, build after changing one
# copied file, and a derived build (stored base + nginx + openssh-server) next to
# `mmdebstrap --include` of the same package set, all in the same run. Needs root.
#
#   cargo test --workspace --no-run && cargo-appliance/benches/build.sh [BINARY]
#
# The binary defaults to the one `cargo test` builds (the same profile as the tests).
set -euo pipefail

repo=$(cd "$(dirname "$0")/../.." && pwd)
target=${CARGO_TARGET_DIR:-$repo/target}
bin=${1:-$target/debug/cargo-appliance}
runs=${RUNS:-5}
work=$(mktemp -d /var/tmp/appliance-bench.XXXXXX)
trap 'rm -rf "$work"' EXIT

store=$work/store
ws=$work/demo
cp -a "$repo/fixtures/demo" "$ws"
rm -rf "$ws/target" "$ws/Appliance.lock"
# The package set compared with mmdebstrap is the manifest's own: no disk output (which would
# add a kernel and a boot loader); disk writing has its own benchmark (disk.sh).
sed -i '/output "qcow2"/d' "$ws/appliance.kdl"
export CARGO_TARGET_DIR=$work/demo-target

now() { date +%s.%N; }
elapsed() { echo "$(now) - $1" | bc; }
# Seconds of one build of `web`, total and before outputs, from the JSON messages.
build_web() {
    "$bin" --store "$store" build --manifest-path "$ws/Cargo.toml" -a web --message-format json |
        python3 -c 'import json,sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "appliance-built":
        print("%.3f %.3f" % (m["seconds"], m["seconds"] - m["output_seconds"]))'
}
median() { sort -n | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }

echo "creating the base (not timed)…" >&2
"$bin" --store "$store" -q base create debian/bookworm --suite bookworm

start=$(now)
read -r cold_total cold_before < <(build_web)
cold_wall=$(elapsed "$start")

# The no-op build alone, as a user runs it: no JSON parser in the timed pipeline.
noop=()
for _ in $(seq "$runs"); do
    start=$(now)
    "$bin" --store "$store" build --manifest-path "$ws/Cargo.toml" -a web -q
    noop+=("$(elapsed "$start")")
done
noop_median=$(printf '%s\n' "${noop[@]}" | median)

one_total=(); one_before=()
for i in $(seq "$runs"); do
    echo "<h1>change $i</h1>" >"$ws/static/index.html"
    read -r total before < <(build_web)
    one_total+=("$total"); one_before+=("$before")
done
one_total_median=$(printf '%s\n' "${one_total[@]}" | median)
one_before_median=$(printf '%s\n' "${one_before[@]}" | median)

# Derived build: the package step again from the stored base, .debs cached in the store and
# the base's materialized copy cached from the cold build (as for any later build from it).
"$bin" --store "$store" -q image rm web/packages --recursive >/dev/null
start=$(now)
read -r derived_total derived_before < <(build_web)
derived=$(elapsed "$start")
# The same without the materialized copy: the first build from a newly created base.
"$bin" --store "$store" -q image rm web/packages --recursive >/dev/null
rm -rf "$store/cache/trees"
sync
start=$(now)
read -r _ uncached_before < <(build_web)
uncached=$(elapsed "$start")

start=$(now)
mmdebstrap --quiet --variant=minbase --include=nginx,openssh-server bookworm "$work/mm.tar" >/dev/null 2>&1
mmdebstrap_time=$(elapsed "$start")

printf '\n%-52s %10s %10s %8s\n' "build of fixtures/demo appliance web" "seconds" "target" "ratio"
printf '%-52s %10.2f %10s %8s\n' "cold (package step, cargo, files; wall)" "$cold_wall" "-" "-"
printf '%-52s %10.2f %10s %8s\n' "  of which before outputs" "$cold_before" "-" "-"
printf '%-52s %10.3f %10s %8s\n' "no-op (wall, median of $runs)" "$noop_median" "0.2" "-"
printf '%-52s %10.3f %10s %8s\n' "one copied file changed, before outputs (median)" "$one_before_median" "2.0" "-"
printf '%-52s %10.3f %10s %8s\n' "one copied file changed, with tar output (median)" "$one_total_median" "-" "-"
printf '%-52s %10.2f %10s %8.2f\n' "derived: stored base + nginx + openssh-server (wall)" "$derived" "0.3x" "$(echo "$derived / $mmdebstrap_time" | bc -l)"
printf '%-52s %10.2f %10s %8.2f\n' "  of which before outputs" "$derived_before" "0.3x" "$(echo "$derived_before / $mmdebstrap_time" | bc -l)"
printf '%-52s %10.2f %10s %8.2f\n' "  base not materialized yet (wall)" "$uncached" "-" "$(echo "$uncached / $mmdebstrap_time" | bc -l)"
printf '%-52s %10.2f %10s %8.2f\n' "    of which before outputs" "$uncached_before" "-" "$(echo "$uncached_before / $mmdebstrap_time" | bc -l)"
printf '%-52s %10.2f %10s %8s\n' "mmdebstrap --variant=minbase --include=(same)" "$mmdebstrap_time" "-" "1.00"

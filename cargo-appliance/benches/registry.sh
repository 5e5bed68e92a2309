#!/usr/bin/env bash
# Registry benchmark (issue 17). Prints a table: push and pull of the demo's `web` next to
# `skopeo copy` of the same image between the same kinds of places, all in the same run; the
# push with its lineage (three images where skopeo copies one; a pull brings the lineage
# always), and a re-push and re-pull with nothing new. Each side has a registry of its
# own (Docker's registry on loopback), so neither finds the other's blobs. Needs root (the
# demo's package step).
#
#   cargo build --release && cargo-appliance/benches/registry.sh target/release/cargo-appliance
#
# The binary defaults to the one `cargo test` builds (the same profile as the tests).
set -euo pipefail

repo=$(cd "$(dirname "$0")/../.." && pwd)
target=${CARGO_TARGET_DIR:-$repo/target}
bin=${1:-$target/debug/cargo-appliance}
runs=${RUNS:-5}
work=$(mktemp -d /var/tmp/appliance-bench.XXXXXX)
# start_registry runs in a command substitution (a subshell): each registry's PID goes to a
# file, so the cleanup can stop them all.
cleanup() {
    for pidfile in "$work"/*/pid; do
        [ -f "$pidfile" ] && kill "$(cat "$pidfile")" 2>/dev/null || true
    done
    rm -rf "$work"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
# start_registry NAME → prints HOST:PORT
start_registry() {
    local dir=$work/$1 port
    port=$(free_port)
    mkdir -p "$dir"
    cat >"$dir/config.yml" <<EOF
version: 0.1
log:
  level: error
  accesslog:
    disabled: true
storage:
  filesystem:
    rootdirectory: $dir/data
http:
  addr: 127.0.0.1:$port
EOF
    docker-registry serve "$dir/config.yml" >"$dir/log" 2>&1 &
    echo "$!" >"$dir/pid"
    for _ in $(seq 100); do
        if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then break; fi
        sleep 0.1
    done
    echo "127.0.0.1:$port"
}

store=$work/store
ws=$work/demo
cp -a "$repo/fixtures/demo" "$ws"
rm -rf "$ws/target" "$ws/Appliance.lock"
# The image as a team shares it: no disk output (a kernel and a boot loader would only make
# both sides slower alike).
sed -i '/output "qcow2"/d' "$ws/appliance.kdl"
export CARGO_TARGET_DIR=$work/demo-target
export APPLIANCE_NO_SEED=1

now() { date +%s.%N; }
elapsed() { echo "$(now) - $1" | bc; }
median() { sort -n | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }
timed() { local start; start=$(now); "$@" >/dev/null; elapsed "$start"; }
timed_median() {
    local times=()
    for _ in $(seq "$runs"); do times+=("$(timed "$@")"); done
    printf '%s\n' "${times[@]}" | median
}

echo "creating the base and building web (not timed)…" >&2
"$bin" --store "$store" -q base create debian/bookworm --suite bookworm
"$bin" --store "$store" -q build --manifest-path "$ws/Cargo.toml" -a web
layout=$CARGO_TARGET_DIR/appliance/web/web.oci
image=$("$bin" --store "$store" images --message-format json |
    python3 -c 'import json,sys
refs=[json.loads(l) for l in sys.stdin]
print(max((r for r in refs if r["name"]=="web"), key=lambda r: int(r["version"]))["version"])')
bytes=$(du -sb "$layout/blobs" | cut -f1)

ours=$(start_registry ours)
alone=$(start_registry alone)
theirs=$(start_registry theirs)
skopeo_push() { skopeo copy --quiet --dest-tls-verify=false "oci:$layout:latest" "docker://$theirs/bench/web:$image"; }
skopeo_pull() { skopeo copy --quiet --src-tls-verify=false "docker://$theirs/bench/web:$image" "oci:$work/pulled:$image"; }
# A pull into the store ends with the tree unpacked and indexed: the fair baseline also
# unpacks what it copied (umoci, as root, keeping owners).
skopeo_pull_unpack() {
    skopeo copy --quiet --src-tls-verify=false "docker://$theirs/bench/web:$image" "oci:$work/pulled-unpacked:$image"
    umoci raw unpack --image "$work/pulled-unpacked:$image" "$work/rootfs" >/dev/null 2>&1
}
# The store's pull is durable (syncfs before the catalog names the new objects); the same
# baseline made durable too.
skopeo_pull_unpack_sync() { skopeo_pull_unpack; sync -f "$work/rootfs"; }
ours_push() { "$bin" --store "$store" -q push "web@$image" "$ours/bench/web" --lineage; }
ours_push_alone() { "$bin" --store "$store" -q push "web@$image" "$alone/bench/web"; }
ours_pull() { "$bin" --store "$work/store2" -q pull "$ours/bench/web:$image"; }

push_alone=$(timed ours_push_alone)
push_skopeo=$(timed skopeo_push)
push=$(timed ours_push)
repush=$(timed_median ours_push)
repush_skopeo=$(timed_median skopeo_push)
# syncfs flushes the whole filesystem: what earlier steps left dirty is flushed first, untimed.
sync
pull=$(timed ours_pull)
pull_skopeo=$(timed skopeo_pull)
# Each unpack starts from nothing; removing the last one is not timed.
fresh_unpack() { rm -rf "$work/pulled-unpacked" "$work/rootfs"; sync; }
fresh_unpack
pull_unpack=$(timed skopeo_pull_unpack)
fresh_unpack
pull_unpack_sync=$(timed skopeo_pull_unpack_sync)
repull=$(timed_median ours_pull)
repull_skopeo=$(timed_median skopeo_pull)

ratio() { echo "$1 / $2" | bc -l; }
printf '\nfixtures/demo web@%s, %s MiB of layer blobs (3 lineage steps)\n' "$image" "$((bytes / 1048576))"
printf '%-40s %10s %12s %8s %8s\n' "operation" "seconds" "skopeo copy" "ratio" "target"
printf '%-40s %10.3f %12.3f %8.2f %8s\n' "push to an empty registry" "$push_alone" "$push_skopeo" "$(ratio "$push_alone" "$push_skopeo")" "1.0x"
printf '%-40s %10.3f %12.3f %8.2f %8s\n' "  … --lineage (3 images; skopeo: 1)" "$push" "$push_skopeo" "$(ratio "$push" "$push_skopeo")" "-"
printf '%-40s %10.3f %12.3f %8.2f %8s\n' "re-push, nothing new (median of $runs)" "$repush" "$repush_skopeo" "$(ratio "$repush" "$repush_skopeo")" "0.1 s"
printf '%-40s %10.3f %12.3f %8.2f %8s\n' "pull into an empty store (oci: dir)" "$pull" "$pull_skopeo" "$(ratio "$pull" "$pull_skopeo")" "1.0x"
printf '%-40s %10.3f %12.3f %8.2f %8s\n' "  … vs skopeo copy + umoci raw unpack" "$pull" "$pull_unpack" "$(ratio "$pull" "$pull_unpack")" "1.0x"
printf '%-40s %10.3f %12.3f %8.2f %8s\n' "  … vs the same + sync (durable)" "$pull" "$pull_unpack_sync" "$(ratio "$pull" "$pull_unpack_sync")" "1.0x"
printf '%-40s %10.3f %12.3f %8.2f %8s\n' "re-pull, nothing new (median of $runs)" "$repull" "$repull_skopeo" "$(ratio "$repull" "$repull_skopeo")" "0.1 s"

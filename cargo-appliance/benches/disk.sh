#!/usr/bin/env bash
# Disk output benchmark (issue 5). Builds the demo's nginx appliance once (not timed), then
# times our raw and qcow2 writers (`image export -o web.raw|web.qcow2`, from the store)
# against the hand pipeline on the same tree (already staged as a directory):
# mke2fs -d + mkfs.vfat/mcopy + sfdisk + dd, and qemu-img convert for qcow2. Needs root.
#
#   cargo test --workspace --no-run && cargo-appliance/benches/disk.sh [BINARY]
set -euo pipefail

repo=$(cd "$(dirname "$0")/../.." && pwd)
target=${CARGO_TARGET_DIR:-$repo/target}
bin=${1:-$target/debug/cargo-appliance}
work=$(mktemp -d /var/tmp/appliance-disk-bench.XXXXXX)
trap 'rm -rf "$work"' EXIT
store=$work/store
ws=$work/demo
cp -a "$repo/fixtures/demo" "$ws"
rm -rf "$ws/target" "$ws/Appliance.lock"
# The disk is what is measured: the demo's other outputs are left out.
sed -i '/output "oci"/d; /output "tar"/d' "$ws/appliance.kdl"
export CARGO_TARGET_DIR=$work/demo-target

now() { date +%s.%N; }
elapsed() { echo "$(now) - $1" | bc; }

echo "creating the base and building web (not timed)…" >&2
"$bin" --store "$store" -q base create debian/bookworm --suite bookworm
"$bin" --store "$store" -q build --manifest-path "$ws/Cargo.toml" -a web

start=$(now); "$bin" --store "$store" -q image export web -o "$work/ours.raw"; ours_raw=$(elapsed "$start")
start=$(now); "$bin" --store "$store" -q image export web -o "$work/ours.qcow2"; ours_qcow2=$(elapsed "$start")

# The hand pipeline on the same tree, staged once (not timed).
"$bin" --store "$store" -q image export web -o "$work/tree"
kernel=$(ls "$work"/tree/boot/vmlinuz-* | sort | tail -1)
initrd=$(ls "$work"/tree/boot/initrd.img-* | sort | tail -1)
hand() {
    local disk=$1
    rm -f "$work/esp.img" "$work/root.img" "$disk"
    mkfs.vfat -F 32 -n ESP -C "$work/esp.img" $((128 * 1024)) >/dev/null
    mmd -i "$work/esp.img" ::/EFI ::/EFI/BOOT ::/loader ::/loader/entries
    mcopy -i "$work/esp.img" "$work/tree/usr/lib/systemd/boot/efi/systemd-bootx64.efi" ::/EFI/BOOT/BOOTX64.EFI
    mcopy -i "$work/esp.img" "$kernel" ::/vmlinuz
    mcopy -i "$work/esp.img" "$initrd" ::/initrd.img
    local size_mib
    size_mib=$(( $(du -sm "$work/tree" | cut -f1) * 4 / 3 + 256 ))
    mke2fs -q -F -t ext4 -d "$work/tree" "$work/root.img" "${size_mib}M"
    truncate -s $(( (size_mib + 128 + 2) * 1024 * 1024 )) "$disk"
    printf 'label: gpt\nstart=2048, size=%d, type=C12A7328-F81F-11D2-BA4B-00A0C93EC93B\nsize=%d, type=4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709\n' \
        $((128 * 2048)) $((size_mib * 2048)) | sfdisk --quiet "$disk"
    dd if="$work/esp.img" of="$disk" bs=1M seek=1 conv=notrunc,sparse status=none
    dd if="$work/root.img" of="$disk" bs=1M seek=129 conv=notrunc,sparse status=none
}
start=$(now); hand "$work/hand.raw"; hand_raw=$(elapsed "$start")
start=$(now); hand "$work/hand2.raw"; qemu-img convert -f raw -O qcow2 "$work/hand2.raw" "$work/hand.qcow2"; hand_qcow2=$(elapsed "$start")

# One copied file changed: the build updates its disk (the appliance step before it is
# issue 4's business; the build reports the outputs' time on its own).
echo "<h1>changed</h1>" >"$ws/static/index.html"
start=$(now)
report=$("$bin" --store "$store" -q build --manifest-path "$ws/Cargo.toml" -a web --message-format json)
changed_wall=$(elapsed "$start")
changed=$(printf '%s\n' "$report" | sed -n 's/.*"output_seconds":\([0-9.]*\).*/\1/p' | tail -1)

printf '\n%-58s %10s %8s %8s\n' "disk outputs of fixtures/demo web" "seconds" "ratio" "target"
printf '%-58s %10.2f %8.2f %8s\n' "raw: cargo-appliance (from the store)" "$ours_raw" "$(echo "$ours_raw / $hand_raw" | bc -l)" "1.00"
printf '%-58s %10.2f %8s\n' "raw: mkfs.vfat+mcopy, mke2fs -d, sfdisk, dd (staged tree)" "$hand_raw" "1.00"
printf '%-58s %10.2f %8.2f %8s\n' "qcow2: cargo-appliance (from the store)" "$ours_qcow2" "$(echo "$ours_qcow2 / $hand_qcow2" | bc -l)" "1.00"
printf '%-58s %10.2f %8s\n' "qcow2: the same + qemu-img convert" "$hand_qcow2" "1.00"
printf '%-58s %10.2f %8.2f %8s\n' "qcow2 after one copied file changed (build's output time)" "$changed" "$(echo "$changed / $hand_qcow2" | bc -l)" "0.25"
printf '%-58s %10.2f %8s\n' "  the whole build (appliance step and qcow2; wall)" "$changed_wall" "-"

#!/usr/bin/env bash
# The memory a deep chain costs its reader: a SIZE_GIB GiB virtual disk (empty base), then DEPTH
# overlays each writing one 64 KiB cluster in every 512 MiB of the disk (an incremental whose
# changes are spread over the whole disk, so every layer holds an L2 table for every region);
# the top served read-only by sendense-nbd and by qemu-nbd, read whole by `nbdcopy
# --connections=4 ... null:`, and the server's peak resident memory (VmHWM) printed after the
# copy, with MB/s. Images on DIR (tmpfs by default).
#
#   benches/scripts/chain-memory.sh [SIZE_GIB=64] [DEPTH=64] [REPS=2] [DIR=/dev/shm/nb-chainmem]
set -euo pipefail
size=${1:-64} depth=${2:-64} reps=${3:-2} dir=${4:-/dev/shm/nb-chainmem}
bin=$(dirname "$0")/../../target/release/sendense-nbd
[[ -x $bin ]] || { echo "build first: cargo build --release -p nbd-server" >&2; exit 1; }
mkdir -p "$dir"
qemu-img create -q -f qcow2 "$dir/c0.qcow2" "${size}G"
for i in $(seq 1 "$depth"); do
  qemu-img create -q -f qcow2 -u -F qcow2 -b "c$((i - 1)).qcow2" "$dir/c$i.qcow2" "${size}G"
  writes=()
  for r in $(seq 0 $((size * 2 - 1))); do writes+=(-c "write -P $((i % 255 + 1)) $((r * 512 + i % 512))M 64k"); done
  qemu-io -f qcow2 "${writes[@]}" "$dir/c$i.qcow2" > /dev/null
done
port=$((21000 + RANDOM % 4000))
printf '%-12s %4s %10s %14s\n' server rep MB/s "peak RSS MiB"
for rep in $(seq 1 "$reps"); do
  for server in sendense-nbd qemu-nbd; do
    cmd=("$bin"); [[ $server == qemu-nbd ]] && cmd=(qemu-nbd)
    "${cmd[@]}" -r -f qcow2 -x e -p "$port" -t --shared=10 "$dir/c$depth.qcow2" & pid=$!
    until nbdinfo --size "nbd://127.0.0.1:$port/e" >/dev/null 2>&1; do sleep 0.05; done
    sync
    start=$(date +%s.%N)
    nbdcopy --connections=4 --threads=4 "nbd://127.0.0.1:$port/e" null:
    end=$(date +%s.%N)
    hwm=$(awk '/VmHWM/ { print $2 }' "/proc/$pid/status")
    kill "$pid"; wait "$pid" || true
    awk -v n="$server" -v r="$rep" -v s="$size" -v t0="$start" -v t1="$end" -v k="$hwm" \
      'BEGIN { printf "%-12s %4d %10.1f %14.1f\n", n, r, s * 1073.741824 / (t1 - t0), k / 1024 }'
  done
done
rm -rf "$dir"

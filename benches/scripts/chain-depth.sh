#!/usr/bin/env bash
# Reading through a deep backing chain, as a restore of the newest of many incrementals reads
# (hub `max_chain`, qcow2 `MAX_BACKING_DEPTH`): a SIZE MiB random disk converted to qcow2, then
# overlays on it, each with 16 scattered 64 KiB writes (an incremental's changes); the top of the
# chain at each DEPTH served read-only by sendense-nbd and by qemu-nbd, alternating, and read
# whole by `nbdcopy --connections=4 ... null:`. Prints MB/s and the server's CPU seconds per GB
# (user+system of the whole process over the copy); `sync` before each copy, images on DIR.
#
#   benches/scripts/chain-depth.sh [SIZE_MIB=1024] [REPS=3] [DIR=/dev/shm/nb-chain] [DEPTHS="1 16 64 255"]
set -euo pipefail
size=${1:-1024} reps=${2:-3} dir=${3:-/dev/shm/nb-chain} depths=${4:-1 16 64 255}
bin=$(dirname "$0")/../../target/release/sendense-nbd
[[ -x $bin ]] || { echo "build first: cargo build --release -p nbd-server" >&2; exit 1; }
deepest=$(tr ' ' '\n' <<< "$depths" | sort -n | tail -1)
mkdir -p "$dir"
head -c "$((size << 20))" /dev/urandom > "$dir/src.raw"
qemu-img convert -f raw -O qcow2 "$dir/src.raw" "$dir/c0.qcow2"
rm "$dir/src.raw"
clusters=$((size * 16))
for i in $(seq 1 "$deepest"); do
  qemu-img create -q -f qcow2 -u -F qcow2 -b "c$((i - 1)).qcow2" "$dir/c$i.qcow2" "${size}M"
  writes=()
  for _ in $(seq 1 16); do writes+=(-c "write -P $((i % 255 + 1)) $(((RANDOM * 32768 + RANDOM) % clusters * 65536)) 64k"); done
  qemu-io -f qcow2 "${writes[@]}" "$dir/c$i.qcow2" > /dev/null
done
port=$((21000 + RANDOM % 4000))
cpu() { awk '{ print $14 + $15 }' "/proc/$1/stat"; }
tck=$(getconf CLK_TCK)
printf '%-12s %6s %4s %10s %12s\n' server depth rep MB/s "CPU s/GB"
for rep in $(seq 1 "$reps"); do
  for depth in $depths; do
    for server in sendense-nbd qemu-nbd; do
      cmd=("$bin"); [[ $server == qemu-nbd ]] && cmd=(qemu-nbd)
      "${cmd[@]}" -r -f qcow2 -x e -p "$port" -t --shared=10 "$dir/c$depth.qcow2" & pid=$!
      until nbdinfo --size "nbd://127.0.0.1:$port/e" >/dev/null 2>&1; do sleep 0.05; done
      sync
      c0=$(cpu "$pid"); start=$(date +%s.%N)
      nbdcopy --connections=4 --threads=4 "nbd://127.0.0.1:$port/e" null:
      end=$(date +%s.%N); c1=$(cpu "$pid")
      kill "$pid"; wait "$pid" || true
      awk -v n="$server" -v d="$depth" -v r="$rep" -v s="$size" -v t0="$start" -v t1="$end" \
        -v u0="$c0" -v u1="$c1" -v hz="$tck" \
        'BEGIN { gb = s * 1.048576 / 1000; printf "%-12s %6d %4d %10.1f %12.2f\n", n, d, r, gb * 1000 / (t1 - t0), (u1 - u0) / hz / gb }'
    done
  done
done
rm -rf "$dir"

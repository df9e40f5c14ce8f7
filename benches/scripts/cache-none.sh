#!/usr/bin/env bash
# --cache=none against --cache=writeback, sendense-nbd on disk (issue 11): `nbdcopy --flush
# --connections=4 --threads=4` of SIZE MiB of random data (the source on /dev/shm, so it does not
# touch the disk's page cache) into a fresh sparse raw image or `qemu-img create -f qcow2`, modes
# alternating within each repetition; `sync` and dropped caches before each run; prints MB/s and
# how much the page cache (`Cached:` in /proc/meminfo) grew during the copy.
#
#   benches/scripts/cache-none.sh [SIZE_MIB=1024] [REPS=3] [DIR=/tmp/nb-cache] [FORMAT=raw|qcow2]   (as root)
set -euo pipefail
size=${1:-1024} reps=${2:-3} dir=${3:-/tmp/nb-cache} format=${4:-raw}
bin=$(dirname "$0")/../../target/release/sendense-nbd
[[ -x $bin ]] || { echo "build first: cargo build --release -p nbd-server" >&2; exit 1; }
mkdir -p "$dir" /dev/shm/nb-cache-src
src=/dev/shm/nb-cache-src/src.raw
[[ -s $src ]] || head -c "$((size << 20))" /dev/urandom > "$src"
cached() { awk '/^Cached:/ {print $2}' /proc/meminfo; }
port=$((21000 + RANDOM % 4000))
printf '%-18s %4s %10s %14s\n' mode rep MB/s "Cached +MiB"
for rep in $(seq 1 "$reps"); do
  for mode in none writeback; do
    rm -f "$dir/img"
    case $format in
      raw) truncate -s 8G "$dir/img" ;;
      qcow2) qemu-img create -q -f qcow2 "$dir/img" 8G ;;
      *) echo "format must be raw or qcow2" >&2; exit 1 ;;
    esac
    sync; echo 3 > /proc/sys/vm/drop_caches
    "$bin" -f "$format" -x e -p "$port" -t --shared=10 --cache="$mode" "$dir/img" & pid=$!
    until nbdinfo --size "nbd://127.0.0.1:$port/e" >/dev/null 2>&1; do sleep 0.05; done
    before=$(cached); start=$(date +%s.%N)
    nbdcopy --flush --connections=4 --threads=4 "$src" "nbd://127.0.0.1:$port/e"
    end=$(date +%s.%N); after=$(cached)
    kill "$pid"; wait "$pid" || true
    awk -v m="$format $mode" -v r="$rep" -v s="$size" -v t0="$start" -v t1="$end" -v b="$before" -v a="$after" \
      'BEGIN { printf "%-18s %4d %10.1f %14.1f\n", m, r, s * 1.048576 / (t1 - t0), (a - b) / 1024 }'
  done
done
rm -rf "$dir"

#!/usr/bin/env bash
# --aio=io_uring against --aio=threads, sendense-nbd -f raw (issue 11): `nbdcopy --flush` of SIZE
# MiB of random data into a fresh sparse raw image, then `nbdcopy ... null:` reading it back, with
# 1 and 4 connections, the two modes alternating within each repetition; `sync` and dropped caches
# before each write. Prints MB/s and the server's CPU seconds per GB (user+system of the whole
# process, from /proc/PID/stat, over the copy). CACHE is passed as --cache (writeback or none).
#
#   benches/scripts/aio.sh [SIZE_MIB=1024] [REPS=3] [DIR=/dev/shm/nb-aio] [CACHE=writeback]   (as root)
set -euo pipefail
size=${1:-1024} reps=${2:-3} dir=${3:-/dev/shm/nb-aio} cache=${4:-writeback}
bin=$(dirname "$0")/../../target/release/sendense-nbd
[[ -x $bin ]] || { echo "build first: cargo build --release -p nbd-server" >&2; exit 1; }
mkdir -p "$dir" /dev/shm/nb-aio-src
src=/dev/shm/nb-aio-src/src.raw
[[ -s $src ]] || head -c "$((size << 20))" /dev/urandom > "$src"
port=$((21000 + RANDOM % 4000))
cpu() { awk '{ print $14 + $15 }' "/proc/$1/stat"; }
tck=$(getconf CLK_TCK)
printf '%-9s %-4s %-5s %4s %10s %12s\n' aio op conns rep MB/s "CPU s/GB"
for rep in $(seq 1 "$reps"); do
  for conns in 1 4; do
    for aio in threads io_uring; do
      rm -f "$dir/img"; truncate -s "$((size << 20))" "$dir/img"
      sync; echo 3 > /proc/sys/vm/drop_caches
      for op in write read; do
        ro=(); [[ $op == read ]] && ro=(-r)
        "$bin" -f raw -x e -p "$port" -t --shared=10 --cache="$cache" --aio="$aio" "${ro[@]}" "$dir/img" & pid=$!
        until nbdinfo --size "nbd://127.0.0.1:$port/e" >/dev/null 2>&1; do sleep 0.05; done
        c0=$(cpu "$pid"); start=$(date +%s.%N)
        if [[ $op == write ]]; then
          nbdcopy --flush --connections="$conns" --threads="$conns" "$src" "nbd://127.0.0.1:$port/e"
        else
          nbdcopy --connections="$conns" --threads="$conns" "nbd://127.0.0.1:$port/e" null:
        fi
        end=$(date +%s.%N); c1=$(cpu "$pid")
        kill "$pid"; wait "$pid" || true
        awk -v a="$aio" -v o="$op" -v c="$conns" -v r="$rep" -v s="$size" -v t0="$start" -v t1="$end" \
          -v u0="$c0" -v u1="$c1" -v hz="$tck" \
          'BEGIN { gb = s * 1.048576 / 1000; printf "%-9s %-5s c%-4d %4d %10.1f %12.2f\n", a, o, c, r, gb * 1000 / (t1 - t0), (u1 - u0) / hz / gb }'
      done
    done
  done
done
rm -rf "$dir"

#!/usr/bin/env bash
# NBD over TLS: sendense-nbd against qemu-nbd, both with `--object tls-creds-x509,...
# --tls-creds tls0` on the same certificates (a CA, a server and a client certificate made here
# with openssl; client certificates required, qemu's default), a raw image (or with FORMAT
# qcow2, a fresh `qemu-img create -f qcow2` image of SIZE) on tmpfs. Per
# repetition and connection count (1 and 4), the two servers alternating: `nbdcopy --flush` of
# SIZE MiB of random data into a fresh sparse image through `nbds://`, then `nbdcopy ... null:`
# reading it back; `sync` and dropped caches before each write. Prints MB/s and the server's CPU
# seconds per GB (user+system of the whole process, from /proc/PID/stat, over the copy); the
# client (nbdcopy, libnbd on GnuTLS) is the same for both.
#
#   benches/scripts/tls.sh [SIZE_MIB=1024] [REPS=3] [DIR=/dev/shm/nb-tls] [FORMAT=raw|qcow2]   (as root)
set -euo pipefail
size=${1:-1024} reps=${2:-3} dir=${3:-/dev/shm/nb-tls} format=${4:-raw}
[[ $format == raw || $format == qcow2 ]] || { echo "FORMAT is raw or qcow2" >&2; exit 1; }
bin=$(dirname "$0")/../../target/release/sendense-nbd
[[ -x $bin ]] || { echo "build first: cargo build --release -p nbd-server" >&2; exit 1; }
mkdir -p "$dir" /dev/shm/nb-tls-src
src=/dev/shm/nb-tls-src/src.raw
[[ -s $src ]] || head -c "$((size << 20))" /dev/urandom > "$src"

pki=$(mktemp -d)
trap 'rm -rf "$pki" "$dir"' EXIT
key() { openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2>/dev/null; }
key "$pki/ca-key.pem"
openssl req -x509 -new -key "$pki/ca-key.pem" -out "$pki/ca-cert.pem" -days 2 -subj /CN=bench-ca \
  -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign 2>/dev/null
leaf() { # NAME PURPOSE SAN
  key "$pki/$1-key.pem"
  openssl req -new -key "$pki/$1-key.pem" -subj "/CN=$1" -out "$pki/$1.csr" 2>/dev/null
  printf 'basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=%s\n%s' "$2" "$3" > "$pki/$1.ext"
  openssl x509 -req -in "$pki/$1.csr" -CA "$pki/ca-cert.pem" -CAkey "$pki/ca-key.pem" -CAcreateserial \
    -days 2 -out "$pki/$1-cert.pem" -extfile "$pki/$1.ext" 2>/dev/null
}
leaf server serverAuth 'subjectAltName=DNS:localhost,IP:127.0.0.1'
leaf client clientAuth ''
tls=(--object "tls-creds-x509,id=tls0,dir=$pki,endpoint=server" --tls-creds tls0)

port=$((21000 + RANDOM % 4000))
url="nbds://127.0.0.1:$port/e?tls-certificates=$pki"
cpu() { awk '{ print $14 + $15 }' "/proc/$1/stat"; }
tck=$(getconf CLK_TCK)
printf '%-12s %-5s %-5s %4s %10s %12s\n' server op conns rep MB/s "CPU s/GB"
for rep in $(seq 1 "$reps"); do
  for conns in 1 4; do
    for server in sendense-nbd qemu-nbd; do
      rm -f "$dir/img"
      if [[ $format == raw ]]; then truncate -s "$((size << 20))" "$dir/img"; else qemu-img create -q -f qcow2 "$dir/img" "${size}M"; fi
      sync; echo 3 > /proc/sys/vm/drop_caches
      for op in write read; do
        ro=(); [[ $op == read ]] && ro=(-r)
        if [[ $server == sendense-nbd ]]; then
          "$bin" -f "$format" -x e -p "$port" -t --shared=10 "${tls[@]}" "${ro[@]}" "$dir/img" & pid=$!
        else
          qemu-nbd -f "$format" -x e -p "$port" -b 127.0.0.1 -t --shared=10 "${tls[@]}" "${ro[@]}" "$dir/img" & pid=$!
        fi
        until nbdinfo --size "$url" >/dev/null 2>&1; do sleep 0.05; done
        c0=$(cpu "$pid"); start=$(date +%s.%N)
        if [[ $op == write ]]; then
          nbdcopy --flush --connections="$conns" --threads="$conns" "$src" "$url"
        else
          nbdcopy --connections="$conns" --threads="$conns" "$url" null:
        fi
        end=$(date +%s.%N); c1=$(cpu "$pid")
        kill "$pid"; wait "$pid" || true
        awk -v a="$server" -v o="$op" -v c="$conns" -v r="$rep" -v s="$size" -v t0="$start" -v t1="$end" \
          -v u0="$c0" -v u1="$c1" -v hz="$tck" \
          'BEGIN { gb = s * 1.048576 / 1000; printf "%-12s %-5s c%-4d %4d %10.1f %12.2f\n", a, o, c, r, gb * 1000 / (t1 - t0), (u1 - u0) / hz / gb }'
      done
    done
  done
done

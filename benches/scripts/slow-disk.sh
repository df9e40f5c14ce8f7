#!/usr/bin/env bash
# The hub and the node on a disk whose syncs are slow: every fsync/fdatasync of the test, the hub
# and the node held SYNC_MS (slow-sync.c, preloaded), then the hub's end-to-end test of twenty
# VMs backed up at once through the SSH endpoint. Prints the test's verdict and counts what a
# stalled runtime shows: NBD handshakes the hub timed out, connections the node made again, calls
# between hub and node that failed. All should be 0 (before blocking file work moved off the
# runtimes, 3 s syncs gave 3-5 handshake timeouts and a failed commit call per run, and one run
# in two failed). ~5 min at 3000 ms.
#
#   benches/scripts/slow-disk.sh [SYNC_MS=3000] [TEST=twenty_vms_at_once_through_the_endpoint]
set -euo pipefail
sync_ms=${1:-3000} test=${2:-twenty_vms_at_once_through_the_endpoint}
root=$(cd "$(dirname "$0")/../.." && pwd)
shim=$root/target/slow-sync.so
cc -shared -fPIC -O2 -o "$shim" "$root/benches/scripts/slow-sync.c" -ldl
cd "$root"
bin=$(cargo test -p hub --test e2e --no-run 2>&1 | sed -n 's/.*Executable tests\/e2e\/main.rs (\(.*\))/\1/p')
cargo build --bins
# Up to date with its sources (cargo just said so), but maybe older than the library the test
# build relinked: the e2e tests refuse a node binary older than the node library.
touch target/debug/sendense-node
log=$(mktemp)
status=0
LD_PRELOAD=$shim SLOW_SYNC_US=$((sync_ms * 1000)) RUST_LOG=warn "$bin" --exact "$test" >"$log" 2>&1 || status=$?
grep -E '^test |test result' "$log" || true
printf '%-44s %s\n' "handshakes timed out by the hub" "$(grep -c 'handshake not finished' "$log" || true)"
printf '%-44s %s\n' "connections the node made again" "$(grep -c 'connection not made' "$log" || true)"
printf '%-44s %s\n' "hub-node calls that failed" "$(grep -cE 'node unreachable|node commit failed' "$log" || true)"
echo "full log: $log"
exit "$status"

#!/usr/bin/env bash
# Run every test of the workspace, after installing the real peers the tests talk to.
#
# The interop tests start qemu-img/qemu-io/qemu-nbd, nbdinfo/nbdcopy/nbdsh (libnbd), Debian's
# python3-libnbd, nbdkit and OpenSSH's sshd themselves on 127.0.0.1; they fail (never skip) when a tool is
# missing, so this script installs them first (Debian packages, one `apt-get update`).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

declare -A tool_package=(
  [qemu-img]=qemu-utils [qemu-io]=qemu-utils [qemu-nbd]=qemu-utils
  [nbdinfo]=libnbd-bin [nbdcopy]=libnbd-bin [nbdsh]=libnbd-bin
  [nbdkit]=nbdkit
  [ssh]=openssh-client [ssh-keygen]=openssh-client
  [fincore]=util-linux-extra
  [curl]=curl
)
missing=()
for tool in "${!tool_package[@]}"; do
  command -v "$tool" >/dev/null 2>&1 || missing+=("${tool_package[$tool]}")
done
/usr/bin/python3 -c 'import nbd' >/dev/null 2>&1 || missing+=(python3-libnbd)
[[ -x /usr/sbin/sshd ]] || missing+=(openssh-server)
# The hub's schedule tests compute daylight-saving changes in a named zone.
[[ -e /usr/share/zoneinfo/Europe/Berlin ]] || missing+=(tzdata)

if ((${#missing[@]})); then
  mapfile -t missing < <(printf '%s\n' "${missing[@]}" | sort -u)
  echo "installing test dependencies: ${missing[*]}"
  SUDO=""
  [[ $(id -u) == 0 ]] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi

for tool in "${!tool_package[@]}"; do
  command -v "$tool" >/dev/null || { echo "error: $tool is still missing" >&2; exit 1; }
done
/usr/bin/python3 -c 'import nbd' || { echo "error: python3-libnbd is still missing" >&2; exit 1; }
[[ -x /usr/sbin/sshd ]] || { echo "error: sshd (openssh-server) is still missing" >&2; exit 1; }

# One build from scratch: incremental-compilation caches would only double what the disk holds.
export CARGO_INCREMENTAL=0
cargo fmt --all --check
cargo clippy --workspace --all-targets --locked -- -D warnings
# Every test binary prints its own "test result:" line; finish with one total for the whole run.
log=$(mktemp)
trap 'rm -f "$log"' EXIT
status=0
# --no-fail-fast: one failing test binary does not hide the results of the others.
cargo test --workspace --locked --no-fail-fast 2>&1 | tee "$log" || status=$?
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i) ~ /^passed/) p += $(i-1); if ($(i) ~ /^failed/) f += $(i-1) } }
     END { printf "tests: %d passed, %d failed\n", p, f }' "$log"
exit "$status"

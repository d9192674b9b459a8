#!/usr/bin/env bash
# Instructions the driver spends per 4 KiB read at queue depth 32, counted by callgrind
# against the in-process controller model in instant-completion mode.
#
# Two counts, each taken with callgrind collecting only inside chosen functions:
#   loop  = everything executed inside the I/O loop (`workload`: submit, doorbell, poll,
#           completion hand-back, and the model's work behind the doorbells);
#   model = everything executed inside the model's register handlers (where the emulated
#           controller fetches, executes and completes commands).
# Each is measured at two I/O counts and the difference taken, so set-up costs cancel out.
# Driver instructions per I/O = (Δloop − Δmodel) / ΔI/Os.
set -euo pipefail
cd "$(dirname "$0")/../.."
N1=${N1:-20000}
N2=${N2:-60000}
command -v valgrind >/dev/null || { echo "valgrind is needed: apt-get install valgrind" >&2; exit 1; }
cargo build --release -q -p rnvme-driver --features test-utils --example overhead
bin=${CARGO_TARGET_DIR:-target}/release/examples/overhead
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT

count() { # count IOS FUNCTION-PATTERN...
  local ios=$1; shift
  local toggles=()
  for f in "$@"; do toggles+=("--toggle-collect=$f"); done
  valgrind --tool=callgrind --collect-atstart=no "${toggles[@]}" \
    --callgrind-out-file="$out/cg" "$bin" "$ios" >"$out/run.txt" 2>/dev/null
  awk '/^summary:/ { print $2 }' "$out/cg"
}

loop1=$(count "$N1" 'overhead::workload')
loop2=$(count "$N2" 'overhead::workload')
model1=$(count "$N1" '*Model as rnvme_driver::hw::Hardware>::write32' '*Model as rnvme_driver::hw::Hardware>::read32')
model2=$(count "$N2" '*Model as rnvme_driver::hw::Hardware>::write32' '*Model as rnvme_driver::hw::Hardware>::read32')
cat "$out/run.txt"
python3 - "$loop1" "$loop2" "$model1" "$model2" "$N1" "$N2" <<'PY'
import sys
l1, l2, m1, m2, n1, n2 = (int(x) for x in sys.argv[1:])
ios = n2 - n1
loop, model = l2 - l1, m2 - m1
if loop <= 0 or model <= 0:
    sys.exit("callgrind collected nothing: function names not found")
print(f"per I/O: loop {loop / ios:.1f} instructions, of which model {model / ios:.1f}")
print(f"driver instructions per I/O (4 KiB read, depth 32): {(loop - model) / ios:.1f}")
PY

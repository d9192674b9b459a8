#!/usr/bin/env bash
# Instructions the driver spends per 4 KiB read at queue depth 32, counted by callgrind
# against the in-process controller model in instant-completion mode.
#
# The cost of the I/O loop (`workload`: submit, doorbell, poll, completion hand-back) is
# taken inclusively; the model's register handlers (where the emulated controller does its
# work when a doorbell is rung) are subtracted. What remains is driver code.
set -euo pipefail
cd "$(dirname "$0")/../.."
IOS=${IOS:-200000}
WARMUP=1000
command -v valgrind >/dev/null || { echo "valgrind is needed: apt-get install valgrind" >&2; exit 1; }
cargo build --release -q -p rnvme-driver --features test-utils --example overhead
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
valgrind --tool=callgrind --callgrind-out-file="$out/cg.out" target/release/examples/overhead "$IOS" >"$out/run.txt" 2>"$out/vg.txt"
cat "$out/run.txt"
callgrind_annotate --inclusive=yes --threshold=100 "$out/cg.out" >"$out/annotate.txt"
# Lines look like: "  1,234,567 (12.3%)  file:function [binary]" (or without the percentage).
sum_matching() {
  grep -E "$1" "$out/annotate.txt" | awk '{ gsub(",", "", $1); s += $1 } END { printf "%d\n", s }'
}
loop=$(sum_matching 'overhead::workload')
model=$(sum_matching 'model.* as rnvme_driver::hw::Hardware>::(write32|read32)')
total=$((IOS + WARMUP))
python3 - "$loop" "$model" "$total" <<'PY'
import sys
loop, model, ios = (int(x) for x in sys.argv[1:])
if loop == 0 or model == 0:
    sys.exit("could not find the loop or the model handlers in the callgrind profile")
driver = loop - model
print(f"I/O loop: {loop} instructions, model: {model}, driver: {driver}")
print(f"driver instructions per I/O (4 KiB read, depth 32): {driver / ios:.1f}")
PY

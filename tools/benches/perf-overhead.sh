#!/usr/bin/env bash
# CPU work per I/O of `rnvme perf`'s three ways of driving I/O, counted by callgrind against
# the in-process controller model (4 KiB random reads, depth 32, one thread):
#   direct    - the worker owns its queue pair;
#   callbacks - a reactor owns it and a completer sends each next I/O from the reactor thread;
#   channel   - a reactor owns it and answers the worker over a channel, waking it.
# Each mode runs twice (1 s and 3 s under callgrind) and the difference is divided by the
# difference in I/Os, so set-up cancels out. The model's own work (below its register
# handlers) is left out: what remains is the driver, the reactor and perf's bookkeeping.
# Instructions and data reads and writes are printed: under an emulated CPU (QEMU TCG) every
# memory access costs a software TLB lookup, so both matter. The channel mode also counts the
# client's and the reactor's empty checks while they wait for each other.
set -euo pipefail
cd "$(dirname "$0")/../.."
command -v valgrind >/dev/null || { echo "valgrind is needed: apt-get install valgrind" >&2; exit 1; }
cargo build --release -q -p rnvme-tools --example perf_overhead
bin=target/release/examples/perf_overhead
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT

# count MODE MS -> "ios Ir Dr Dw model_Ir model_Dr model_Dw"
count() {
  valgrind --tool=callgrind --cache-sim=yes --callgrind-out-file="$out/cg" "$bin" "$1" "$2" \
    >"$out/run.txt" 2>/dev/null
  local ios totals model
  ios=$(sed -n 's/.*ios=\([0-9]*\).*/\1/p' "$out/run.txt")
  # Every function, no percentages: columns Ir Dr Dw ... then the name ("." for zero).
  local annotate=(callgrind_annotate --inclusive=yes --show-percs=no --threshold=100 "$out/cg")
  totals=$("${annotate[@]}" 2>/dev/null | awk '/PROGRAM TOTALS/ { print $1, $2, $3; exit }')
  model=$("${annotate[@]}" 2>/dev/null |
    awk '/Model as rnvme_driver::hw::Hardware>::(write|read)32 \[/ { gsub(",", ""); gsub(/^\.$/, "0"); ir += $1; dr += ($2 == "." ? 0 : $2); dw += ($3 == "." ? 0 : $3) } END { print ir + 0, dr + 0, dw + 0 }')
  [ "${model%% *}" != 0 ] || { echo "$1: the model's register handlers are missing from the profile" >&2; exit 1; }
  echo "$ios ${totals//,/} $model"
}

printf '%-10s %12s %12s %12s\n' mode instr/io reads/io writes/io
for mode in direct callbacks channel; do
  a=$(count "$mode" 1000)
  b=$(count "$mode" 3000)
  python3 - "$mode" $a $b <<'PY'
import sys
mode = sys.argv[1]
a = [int(x) for x in sys.argv[2:9]]
b = [int(x) for x in sys.argv[9:16]]
ios = b[0] - a[0]
if ios <= 0:
    sys.exit(f"{mode}: no more I/Os in the longer run ({a[0]} vs {b[0]})")
own = [((b[i] - b[i + 3]) - (a[i] - a[i + 3])) / ios for i in (1, 2, 3)]
print(f"{mode:<10} {own[0]:12.0f} {own[1]:12.0f} {own[2]:12.0f}")
PY
done

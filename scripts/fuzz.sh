#!/usr/bin/env bash
# Runs every cargo-fuzz target of fuzz/ for SECONDS each (or only the
# TARGETs named) and prints, per target, the executions and the crashes.
#
#   scripts/fuzz.sh 60                  # every target, one minute each
#   scripts/fuzz.sh 300 config_yaml     # one target, five minutes
#
# Needs cargo-fuzz (`cargo install cargo-fuzz`) and a C++ compiler. libFuzzer
# needs nightly compiler flags; RUSTC_BOOTSTRAP=1 lets the stable toolchain
# accept them, so no nightly toolchain is needed. Targets are built with
# debug assertions (integer overflow panics, so it counts as a crash).
# New corpus entries go to fuzz/corpus/<target>/ (git-ignored), crashing
# inputs to fuzz/artifacts/<target>/; commit a fixed crash's input under
# tests/fuzz_regressions/<target>/, which tests/fuzz_parsers.rs replays.
# Exit status: 1 when a target crashed.
set -euo pipefail

seconds=${1:?usage: scripts/fuzz.sh SECONDS [TARGET...]}
shift
cd "$(dirname "$0")/../fuzz"
if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "cargo-fuzz is not installed: cargo install cargo-fuzz" >&2
  exit 2
fi
export RUSTC_BOOTSTRAP=1
if [ $# -gt 0 ]; then
  targets=("$@")
else
  mapfile -t targets < <(cargo fuzz list)
fi

# One build for all targets, with the flags every `run` below uses.
build_log=$(mktemp)
if ! cargo fuzz build --debug-assertions >"$build_log" 2>&1; then
  cat "$build_log" >&2
  exit 2
fi
rm -f "$build_log"

results=()
failed=0
for target in "${targets[@]}"; do
  mkdir -p "corpus/$target" "artifacts/$target"
  before=$(find "artifacts/$target" -type f | wc -l)
  log=$(mktemp)
  status=0
  # -rss_limit_mb, -timeout: a slow or memory-hungry input is a finding too.
  cargo fuzz run --debug-assertions "$target" "corpus/$target" "seeds/$target" -- \
    -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
    >"$log" 2>&1 || status=$?
  runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
  corpus=$(find "corpus/$target" -type f | wc -l)
  after=$(find "artifacts/$target" -type f | wc -l)
  crashes=$((after - before))
  if [ "$status" -ne 0 ] && [ "$crashes" -eq 0 ]; then
    # Stopped without leaving an input behind: show why.
    tail -20 "$log" >&2
    crashes="?"
  fi
  if [ "$crashes" != 0 ]; then
    failed=1
    echo "== $target: crashed; log tail and new artifacts:" >&2
    tail -30 "$log" >&2
    find "artifacts/$target" -type f -newer "$log" >&2 || true
  fi
  results+=("$(printf '%-20s %12s %8s %8s' "$target" "${runs:-?}" "$crashes" "$corpus")")
  rm -f "$log"
done

printf '%-20s %12s %8s %8s\n' target executions crashes corpus
printf '%s\n' "${results[@]}"
exit "$failed"

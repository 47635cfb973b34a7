#!/usr/bin/env bash
# A kernel candidate against the tree, in one run on one GPU: the tree as it is (A) and with a patch applied (B),
# each timed by the same benchmark command, alternating A B A B, so both see the same machine.
#
#   bash benchmarks/ab_candidate.sh benchmarks/candidates/NAME.patch \
#       python benchmarks/bench_moe_layer.py --parts layer,breakdown --no-autotune
#   bash benchmarks/ab_candidate.sh benchmarks/candidates/NAME.patch python benchmarks/bench_model.py --parts step
#
# The patch is applied to this checkout for the B runs and taken out again after each (also when interrupted), so
# A and B import the package the same way, installed or not. Each run's output goes to $OUT/ab-<A|B>-<round>.log
# (benchmarks/out/ when OUT is unset); ROUNDS (default 2) sets how many A B pairs run, RUN_TIMEOUT (default 150) the
# seconds each run may take.
set -uo pipefail
patch=$(realpath "$1")
shift
cd "$(dirname "${BASH_SOURCE[0]}")/.."
out=${OUT:-$PWD/benchmarks/out}
mkdir -p "$out"
git apply --check "$patch" || { echo "ab_candidate: $patch does not apply to this tree" >&2; exit 1; }
applied=0
restore() { if ((applied)); then git apply -R "$patch" && applied=0; fi; }
trap restore EXIT
for round in $(seq 1 "${ROUNDS:-2}"); do
    for side in A B; do
        if [[ $side == B ]]; then git apply "$patch" && applied=1; fi
        OUT= timeout "${RUN_TIMEOUT:-150}" "$@" > "$out/ab-$side-$round.log" 2>&1
        echo "ab_candidate: $side round $round rc=$? -> $out/ab-$side-$round.log"
        restore
    done
done

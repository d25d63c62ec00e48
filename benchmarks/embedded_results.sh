#!/usr/bin/env bash
# Every embedded-default measurement in docs/RESULTS.md, in the order they depend on each
# other: dense fine-tuning (the reference), weight-level gates at 2.86x / 4.26x / 6x, the packed and ONNX
# forms of 4.26x, structured gates at 2x / 2.86x, CPU inference, the ablation.
#
#   bash benchmarks/embedded_results.sh [RUNS_DIR]        # default runs/; about 2 h here
#
# A step whose run directory already holds report.json (results.json for fine-tuning) is
# skipped, so a killed script is rerun as is. Each step's output goes to RUNS_DIR/NAME.log,
# timed by /usr/bin/time -v when it exists. Nothing here is printed as a result: the
# numbers are in each run's report.md and in the tables the benchmarks print.
set -euo pipefail
runs=${1:-runs}
mkdir -p "$runs"
timer=()
if [ -x /usr/bin/time ]; then timer=(/usr/bin/time -v); fi

step() {  # step NAME DONE_FILE COMMAND...   (DONE_FILE "" always runs)
    local name=$1 done_file=$2
    shift 2
    if [ -e "$done_file" ]; then
        echo "== $name: done before ($done_file)"
        return
    fi
    echo "== $name: $* ($(date -u +%H:%M:%S))"
    "${timer[@]}" "$@" >"$runs/$name.log" 2>&1
}

# Laid out as benchmarks/compare.py lays out seed 0, so that its full run reuses these.
c="$runs/compare/seed0"
dense="$c/dense"
step dense "$dense/report.json" pinchgate compress --method dense \
    --no-train-dense-reference --output-dir "$dense"
ref=(--dense-reference "$dense" --no-train-dense-reference)
for ratio in 2.86 4.26 6; do
    step "gates-${ratio}x" "$c/gates-${ratio}x/report.json" pinchgate compress \
        --target-ratio "$ratio" "${ref[@]}" --output-dir "$c/gates-${ratio}x"
done

packed="$runs/gates-4.26x-packed"
step pack-4.26x "$packed/config.json" pinchgate pack "$c/gates-4.26x" "$packed" --values fp32
step pack-4.26x-int8 "$packed-int8/config.json" \
    pinchgate pack "$c/gates-4.26x" "$packed-int8" --values int8
step onnx-4.26x "$runs/gates-4.26x.onnx" pinchgate export "$packed" \
    "$runs/gates-4.26x.onnx" --check --check-data embedded:test --check-data embedded:test-unseen

for ratio in 2 2.86; do
    step "structured-${ratio}x" "$c/structured-${ratio}x/report.json" pinchgate compress \
        --method structured --target-ratio "$ratio" "${ref[@]}" \
        --output-dir "$c/structured-${ratio}x"
done

step inference "$runs/inference.json" python benchmarks/inference.py \
    --model "dense=$dense" --model "gates-2.86x=$c/gates-2.86x" \
    --model "packed-4.26x=$packed" \
    --model "struct-2x=$c/structured-2x/model-shrunk" \
    --model "struct-2.86x=$c/structured-2.86x/model-shrunk" \
    --rounds 3 --onnx --json "$runs/inference.json"

# The ablation's default variant is the 2.86x run above: same command, same seed.
[ -e "$runs/ablation-default" ] || ln -s compare/seed0/gates-2.86x "$runs/ablation-default"
# No done file: ablation.py skips the variants that finished before and prints the table.
step ablation "" python benchmarks/ablation.py \
    --dense-reference "$dense" --out "$runs/ablation"
echo "== all done ($(date -u +%H:%M:%S)); tables: python benchmarks/ablation.py --table-only," \
    "python benchmarks/inference.py --from-json $runs/inference.json"

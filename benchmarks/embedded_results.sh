#!/usr/bin/env bash
# Every embedded-default measurement in docs/RESULTS.md (Whisper tiny.en), in the order they
# depend on each other:
#   1. the main command, timed (zero-shot, gates at 2.86x, the dense reference);
#   2. zero-shot tiny.en at the stock 30 s window (the window's cost in WER), and one-shot
#      magnitude pruning with no training (how much tiny.en tolerates);
#   3. the comparison benchmark at 2.86x and 4.26x (every method, and the gates at equal
#      compute), and the gates alone at 2x and 6x;
#   4. gate overhead (a compression step against a dense step);
#   5. the packed files of the 4.26x model, unpacked and scored;
#   6. the design ablation at 2.86x;
#   7. deployment runtimes: ONNX and CTranslate2 (fp32, int8) exports of the dense and 2.86x
#      models checked transcript by transcript, where decoding time goes, a structured run
#      that removes half the decoder layers, and the decoding benchmark over runtimes.
#
#   bash benchmarks/embedded_results.sh [RUNS_DIR]        # default runs/; several hours here
#
# A step whose result file already exists is skipped, so a killed script is rerun as is.
# Each step's output goes to RUNS_DIR/NAME.log, timed by /usr/bin/time -v when it exists.
# The numbers are in each run's report.md and in the tables the benchmarks print.
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

step main "$runs/embedded-compress/report.json" \
    pinchgate compress --output-dir "$runs/embedded-compress"
step zero-shot-30s "$runs/zero-shot-30s/results.json" pinchgate evaluate whisper-tiny.en \
    --data embedded:test --data embedded:test-unseen --data embedded:real \
    --output-dir "$runs/zero-shot-30s"

step oneshot "" python benchmarks/oneshot_sensitivity.py

c="$runs/compare"
step compare "$c/seed0/structured-4.26x/report.json" python benchmarks/compare.py \
    --out "$c" --ratios 2.86 4.26
step compare-long "$c/seed0/gates-long-4.26x/report.json" python benchmarks/compare.py \
    --out "$c" --ratios 2.86 4.26 --methods gates-long
step gates-2x-6x "$c/seed0/gates-6x/report.json" python benchmarks/compare.py \
    --out "$c" --ratios 2 6 --methods gates
step gate-overhead "" python benchmarks/gate_overhead.py --rounds 3 --steps 6

packed="$runs/gates-4.26x-packed"
step pack-4.26x "$packed/config.json" pinchgate pack "$c/seed0/gates-4.26x" "$packed"
step pack-4.26x-int8 "$packed-int8/config.json" \
    pinchgate pack "$c/seed0/gates-4.26x" "$packed-int8" --values int8
step unpack-4.26x-int8 "$packed-int8-eval/results.json" bash -c \
    "pinchgate unpack $packed-int8 $packed-int8-hf && pinchgate evaluate $packed-int8-hf \
     --data embedded:test --data embedded:real --output-dir $packed-int8-eval"

# The ablation's default variant is the comparison's 2.86x gates run: same command and seed.
[ -e "$runs/ablation-default" ] || ln -s compare/seed0/gates-2.86x "$runs/ablation-default"
step ablation "" python benchmarks/ablation.py \
    --dense-reference "$c/seed0/dense" --out "$runs/ablation"
for model in dense gates-2.86x; do
    src="$c/seed0/$model"
    sets=(--check-data embedded:test --check-data embedded:real)
    step "onnx-$model" "$runs/onnx-$model/decoder.onnx" \
        pinchgate export "$src" "$runs/onnx-$model" --check "${sets[@]}"
    for q in float32 int8; do
        step "ct2-$model-$q" "$runs/ct2-$model-$q/model.bin" pinchgate export "$src" \
            "$runs/ct2-$model-$q" --format ct2 --quantization "$q" "${sets[@]}"
    done
done
step profile "" python benchmarks/whisper_profile.py --model "$c/seed0/dense/model" \
    --ct2 "$runs/ct2-dense-int8" --ct2-compute-type int8
s19="$runs/s19"
step s19-layers-half "$s19/layers-half/report.json" pinchgate compress \
    --method structured:units=layers --target-sparsity 0.5 --dense-reference "$c/seed0/dense" \
    --no-train-dense-reference --no-zero-shot --output-dir "$s19/layers-half"
step decode-bench "" python benchmarks/whisper_decode.py --model dense="$c/seed0/dense" \
    --model gates-2.86x="$c/seed0/gates-2.86x" --model layers-half="$s19/layers-half/model-shrunk" \
    --utterances 40 \
    --work "$runs/decode-bench" --json "$runs/decode-bench.json" --plot "$runs/decode-bench.png"
s19b="$runs/s19b"
step structure-speed "" python benchmarks/whisper_structure_speed.py --rounds 2
step s19b-lf60 "$s19b/lf60/report.json" pinchgate compress \
    --method structured:units=layers+ffn --target-sparsity 0.6 --frozen-fraction 0.6 \
    --max-steps 300 --dense-reference "$c/seed0/dense" --no-train-dense-reference \
    --no-zero-shot --output-dir "$s19b/lf60"
step window-bench "" python benchmarks/whisper_decode.py --model stock-30s=whisper-tiny.en \
    --model stock-10s=whisper-tiny.en@10 --runtime torch onnx ct2-int8 --utterances 40 \
    --work "$s19b/win" --json "$s19b/win.json" --plot "$s19b/win.png"
step window-significance "" pinchgate significance "$runs/zero-shot-30s" \
    "$runs/embedded-compress/zero-shot"
# The hand-cut single-layer decoder, fine-tuned as the dense reference was (its config
# without the compression options, which finetune refuses).
python - "$c/seed0/dense/config.yaml" "$s19b/dense-ft-config.yaml" <<'PY'
import sys, yaml
from pinchgate.config import FinetuneConfig
saved = yaml.safe_load(open(sys.argv[1]))
keep = {k: v for k, v in saved.items() if k in FinetuneConfig.__dataclass_fields__}
yaml.safe_dump(keep, open(sys.argv[2], "w"))
PY
step cut-variants "$s19b/cut/dec1/config.json" python benchmarks/whisper_structure_speed.py \
    --rounds 0 --save "$s19b/cut" --variant dense=dense --variant dec1=dec=3 --variant dec2=dec=0,3
step ft-dec1 "$s19b/ft-dec1/results.json" pinchgate finetune \
    --config "$s19b/dense-ft-config.yaml" --model "$s19b/cut/dec1" --output-dir "$s19b/ft-dec1"
step ft-dec1-significance "" pinchgate significance "$c/seed0/dense" "$s19b/ft-dec1"
step ft-dec2 "$s19b/ft-dec2/results.json" pinchgate finetune \
    --config "$s19b/dense-ft-config.yaml" --model "$s19b/cut/dec2" --output-dir "$s19b/ft-dec2"
step ft-dec2-significance "" pinchgate significance "$c/seed0/dense" "$s19b/ft-dec2"
step ft-dec2-450 "$s19b/ft-dec2-450/results.json" pinchgate finetune \
    --config "$s19b/dense-ft-config.yaml" --model "$s19b/cut/dec2" --max-steps 450 \
    --output-dir "$s19b/ft-dec2-450"
step ft-dec2-450-significance "" pinchgate significance "$s19b/ft-dec2" "$s19b/ft-dec2-450"
# Distillation into the two-layer decoder, and the FLOP-counting controller (2026-12-02).
s19c="$runs/s19c"
step cut-dense-ft "$s19c/cut/dec2/config.json" python benchmarks/whisper_structure_speed.py \
    --model "$c/seed0/dense/model" --rounds 0 --save "$s19c/cut" --variant dense=dense \
    --variant dec2=dec=0,3
step kd-dec2 "$s19c/kd-dec2/results.json" pinchgate finetune \
    --config "$s19b/dense-ft-config.yaml" --model "$s19b/cut/dec2" \
    --distill-from "$c/seed0/dense" --no-zero-shot --output-dir "$s19c/kd-dec2"
step kd-dec2-significance "" pinchgate significance "$s19b/ft-dec2" "$s19c/kd-dec2"
step kd-dec2-fe "$s19c/kd-dec2-fe/results.json" pinchgate finetune \
    --config "$s19b/dense-ft-config.yaml" --model "$s19c/cut/dec2" --freeze-encoder \
    --learning-rate 1e-4 --distill-from "$c/seed0/dense" --no-zero-shot \
    --output-dir "$s19c/kd-dec2-fe"
step ffn-flops50 "$s19c/ffn-flops50/report.json" pinchgate compress \
    --method structured:units=ffn,cost=flops --target-sparsity 0.5 \
    --dense-reference "$c/seed0/dense" --no-train-dense-reference --no-zero-shot \
    --output-dir "$s19c/ffn-flops50"
# 4 h more synthetic speech (the seed-0 corpus's pretrain split: sentences disjoint from
# every embedded split; needs scripts/install-tts.sh), and the two-layer decoder on it.
step synth4k "$runs/synth4k/corpus.json" pinchgate data synth "$runs/synth4k" \
    --size test-unseen=200 --size test=200 --size dev=200 --size train=800 \
    --size pretrain=4000 --only pretrain
step kd-dec2-4h "$s19c/kd-dec2-4h/results.json" pinchgate finetune \
    --config "$s19b/dense-ft-config.yaml" --model "$s19b/cut/dec2" \
    --train "$runs/synth4k/pretrain" --max-steps 450 --warmup-steps 45 \
    --distill-from "$c/seed0/dense" --no-zero-shot --output-dir "$s19c/kd-dec2-4h"
step kd-dec2-4h-significance "" pinchgate significance "$c/seed0/dense" "$s19c/kd-dec2-4h"
step ce-dec2-4h "$s19c/ce-dec2-4h/results.json" pinchgate finetune \
    --config "$s19b/dense-ft-config.yaml" --model "$s19b/cut/dec2" \
    --train "$runs/synth4k/pretrain" --max-steps 450 --warmup-steps 45 --no-zero-shot \
    --output-dir "$s19c/ce-dec2-4h"
step ce-dec2-4h-significance "" pinchgate significance "$c/seed0/dense" "$s19c/ce-dec2-4h"
step ce-vs-kd-4h-significance "" pinchgate significance "$s19c/ce-dec2-4h" "$s19c/kd-dec2-4h"
step kd-dec2-4h-fe "$s19c/kd-dec2-4h-fe/results.json" pinchgate finetune \
    --config "$s19b/dense-ft-config.yaml" --model "$s19b/cut/dec2" \
    --train "$runs/synth4k/pretrain" --max-steps 450 --warmup-steps 45 --freeze-encoder \
    --distill-from "$c/seed0/dense" --no-zero-shot --output-dir "$s19c/kd-dec2-4h-fe"
step kd-dec2-4h-fe-significance "" pinchgate significance "$c/seed0/dense" "$s19c/kd-dec2-4h-fe"
step decode-s19c "" python benchmarks/whisper_decode.py --model dense="$c/seed0/dense" \
    --model kd-dec2-4h="$s19c/kd-dec2-4h" --model ffn-flops50="$s19c/ffn-flops50/model-shrunk" \
    --runtime torch ct2-int8 --utterances 40 --rounds 2 --work "$s19c/decode" \
    --json "$s19c/decode.json" --plot "$s19c/decode.png"
# A smaller vocabulary (pinchgate trim-vocab), and the dense model given the same 4 h
# (2026-12-02).
s19d="$runs/s19d"
step trim-v8k "$s19d/v8k/config.json" pinchgate trim-vocab "$c/seed0/dense" "$s19d/v8k" \
    --keep 8192
step v8k-ft "$s19d/v8k-ft/results.json" pinchgate finetune \
    --config "$s19b/dense-ft-config.yaml" --model "$s19d/v8k" --output-dir "$s19d/v8k-ft"
step v8k-4h "$s19d/v8k-4h/results.json" pinchgate finetune \
    --config "$s19b/dense-ft-config.yaml" --model "$s19d/v8k-ft/model" \
    --train "$runs/synth4k/pretrain" --max-steps 450 --warmup-steps 45 --save-every 50 \
    --output-dir "$s19d/v8k-4h"
step dense-4h "$s19d/dense-4h/results.json" pinchgate finetune \
    --config "$s19b/dense-ft-config.yaml" --model "$c/seed0/dense/model" \
    --train "$runs/synth4k/pretrain" --max-steps 450 --warmup-steps 45 --save-every 50 \
    --output-dir "$s19d/dense-4h"
step dense-4h-significance "" pinchgate significance "$c/seed0/dense" "$s19d/dense-4h"
step v8k-4h-significance "" pinchgate significance "$s19d/dense-4h" "$s19d/v8k-4h"
step dec2-4h-significance "" pinchgate significance "$s19d/dense-4h" "$s19c/ce-dec2-4h"
step trim-v16k "$s19d/cut-v16k/config.json" pinchgate trim-vocab "$c/seed0/dense" \
    "$s19d/cut-v16k" --keep 16384
step v16k-4h "$s19d/v16k-4h/results.json" pinchgate finetune \
    --config "$s19b/dense-ft-config.yaml" --model "$s19d/cut-v16k" \
    --train "$runs/synth4k/pretrain" --max-steps 450 --warmup-steps 45 --save-every 50 \
    --output-dir "$s19d/v16k-4h"
step v16k-4h-significance "" pinchgate significance "$s19d/dense-4h" "$s19d/v16k-4h"
step decode-s19d "" python benchmarks/whisper_decode.py --model dense-4h="$s19d/dense-4h" \
    --model vocab8k-4h="$s19d/v8k-4h" --utterances 40 --rounds 2 --work "$s19d/decode" \
    --json "$s19d/decode.json" --plot "$s19d/decode.png"
step decode-s19d-16k "" python benchmarks/whisper_decode.py --model dense-4h="$s19d/dense-4h" \
    --model vocab16k-4h="$s19d/v16k-4h" --runtime torch ct2-int8 --utterances 40 --rounds 2 \
    --work "$s19d/decode16" --json "$s19d/decode16.json"
echo "== all done ($(date -u +%H:%M:%S)); tables: python benchmarks/compare.py --out $c" \
    "--report-only --methods gates ump global-magnitude gmp parp str structured gates-long;" \
    "python benchmarks/ablation.py --table-only --dense-reference $c/seed0/dense"

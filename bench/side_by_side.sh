#!/usr/bin/env bash
# The launcher against the bench's own nanoGPT-style loop (bench/gpu_loop.py) on one GPU, GPT-2 124M (12 layers,
# 12 heads, 768 wide, no bias, dropout 0, tied head, vocabulary 50304), batch 16 x 1024, no accumulation, bf16,
# fused AdamW, clipping 1.0; eager, compiled block by block (regional) and compiled whole; the launcher with the
# plain loss (`train.chunked_loss=false`) and, where it has the key, the chunked one. One Markdown table: tokens/s,
# MFU and peak memory, as ratios to the loop compiled alike (bench/gpu_report.py --side-by-side). Usage, from the
# repository root:
#   bench/side_by_side.sh TOKENS_DIR [STEPS]              (bench/gpu_check.sh runs it)
#   SIDE_TINY=1 bench/side_by_side.sh TOKENS_DIR 30       a smoke run on the CPU: a tiny shape, eager only
# TOKENS_DIR holds train.bin (uint16 token ids below 50304). Runs go to runs/side_by_side/ (SIDE_OUT).
set -euo pipefail
cd "$(dirname "$0")/.."

TOKENS=${1:?usage: bench/side_by_side.sh TOKENS_DIR [STEPS]}
STEPS=${2:-60}
WARMUP=20  # as bench/gpu_report.py's SIDE_WARMUP: compilation and warm-up stay out of the timing
OUT=${SIDE_OUT:-runs/side_by_side}
mkdir -p "$OUT"

RUN=(
    "data.dataset.path=$TOKENS/{split}.bin" "data.dataset.vocab_size=50304" "train.gradient_accumulation_steps=1"
    "train.mixed_precision=bf16" "train.max_steps=$STEPS" "scheduler.warmup_steps=10" "logging.every_steps=10"
    "eval.every_steps=null" "eval.every_epoch=false" "data.val=null" "early_stopping=null"
    "checkpoint.every_steps=null" "checkpoint.keep_best=0" "checkpoint.save_final=false" "strategy.timeout_s=300"
)
LOOP=(--tokens "$TOKENS" --steps "$STEPS" --warmup "$WARMUP")
if [ "${SIDE_TINY:-0}" = 1 ]; then  # bench/gpu_loop.py's TINY shape, on the CPU; compiling there takes minutes
    RUN+=("model.n_layer=2" "model.n_head=2" "model.n_embd=64" "data.dataset.block_size=64" "train.batch_size=4")
    LOOP+=(--tiny --device cpu)
    COMPILES=${SIDE_COMPILES:-none}
else
    COMPILES=${SIDE_COMPILES:-none regional whole}
fi

# The chunked loss only where this launcher has the key (until then, its one loss is the plain one).
LOSSES=("")
if python -m launcher validate recipes/gpt_ddp.yaml "${RUN[@]}" train.chunked_loss=false >/dev/null 2>&1; then
    LOSSES=(false true)
else
    echo "== side by side: this launcher has no train.chunked_loss: its default loss only"
fi

runs=()
for compile in $COMPILES; do
    case $compile in
        none) flag="train.compile=false" ;;
        regional) flag="train.compile=true" ;;
        whole) flag="train.compile={regional: false}" ;;
    esac
    echo "== side by side: the hand-written loop, compile $compile, $STEPS steps"
    rm -rf "$OUT/side_loop_$compile"
    python -m bench.gpu_loop "${LOOP[@]}" --compile "$compile" --out "$OUT/side_loop_$compile/loop.json"
    runs+=("$OUT/side_loop_$compile")
    for chunked in "${LOSSES[@]}"; do
        run="$OUT/side_launcher_${compile}${chunked:+_chunked-$chunked}"
        rm -rf "$run"
        echo "== side by side: launcher train, compile $compile${chunked:+, train.chunked_loss=$chunked}, $STEPS steps"
        python -m launcher train recipes/gpt_ddp.yaml "run_dir=$run" "${RUN[@]}" "$flag" \
            ${chunked:+"train.chunked_loss=$chunked"}
        runs+=("$run")
    done
done
echo
python bench/gpu_report.py --side-by-side "${runs[@]}"

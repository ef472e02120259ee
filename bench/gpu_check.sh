#!/usr/bin/env bash
# The GPU path, end to end, on a machine with CUDA GPUs: no host sync in a steady-state training step
# (bench/sync_check.py); the GPT recipes (DDP, FSDP, ZeRO-3) with bf16 and fp16 for a short while on every GPU,
# each saved halfway, resumed from that checkpoint and finished; then tokens/s and MFU per run
# (bench/gpu_report.py). Then the speed features: recipes/gpt_ddp.yaml in bf16 for SPEED_STEPS steps, eager and
# compiled (`train.compile: true`, regional), each without and with activation checkpointing (full), no evaluation
# or checkpoints; tokens/s, MFU, compile time and peak memory per run (bench/gpu_report.py --speed). Then
# recipes/hf_causal_lm.yaml in bf16 under FSDP and ZeRO-3, resumed and exported with --format hf. Then the
# launcher side by side with the bench's own nanoGPT-style loop on GPT-2 124M, bf16, eager and compiled, SIDE_STEPS
# steps each (bench/side_by_side.sh: tokens/s, MFU and peak memory as ratios in one table). Exits non-zero at the
# end if the sync check failed. Usage, from the repository root:
#   bench/gpu_check.sh [TOKENS_DIR] [STEPS] [SPEED_STEPS] [SIDE_STEPS]
# TOKENS_DIR holds train.bin/val.bin (GPT-2 tokens, vocab 50304); without it, byte-level tokens of Tiny
# Shakespeare (vocab 256) are made with `launcher tokenize`. Runs go to runs/gpu_check/.
set -euo pipefail
cd "$(dirname "$0")/.."

STEPS=${2:-60}
SPEED_STEPS=${3:-40}
SIDE_STEPS=${4:-60}
GPUS=$(python -c "import torch; print(torch.cuda.device_count())")
[ "$GPUS" -ge 1 ] || { echo "gpu_check: no CUDA GPU here"; exit 2; }
OUT=runs/gpu_check
mkdir -p "$OUT"

echo "== no host sync in a training step (one GPU, fused AdamW, a NaN update skipped on the device)"
SYNC_OK=1
python -m bench.sync_check || SYNC_OK=0

if [ -n "${1:-}" ]; then
    DATA=("data.dataset.path=$1/{split}.bin")
else
    launcher tokenize ../shared/data/tinyshakespeare.txt --out "$OUT/tokens" >/dev/null
    DATA=("data.dataset.path=$OUT/tokens/{split}.bin" "data.dataset.vocab_size=256")
fi
# A short run: warm-up to the end of the schedule, evaluation and checkpoints halfway and at the end.
SHORT=(
    "train.max_steps=$((STEPS / 2))" "scheduler.warmup_steps=10" "eval.every_steps=$((STEPS / 2))"
    "eval.max_batches=5" "checkpoint.every_steps=$((STEPS / 2))" "logging.every_steps=5" "early_stopping=null"
    "strategy.timeout_s=300"
)
if [ "$GPUS" -gt 1 ]; then LAUNCH=(accelerate launch --multi_gpu --num_processes "$GPUS" -m launcher)
else LAUNCH=(python -m launcher); fi

for recipe in gpt_ddp gpt_fsdp gpt_zero3; do
    for precision in bf16 fp16; do
        if [ "$recipe" = gpt_fsdp ] && [ "$precision" = fp16 ]; then continue; fi  # refused: FSDP2 runs bf16
        run="$OUT/${recipe}_${precision}"
        rm -rf "$run"
        echo "== $recipe $precision on $GPUS GPU(s): $STEPS steps, saved and resumed at $((STEPS / 2))"
        "${LAUNCH[@]}" train "recipes/$recipe.yaml" "run_dir=$run" "train.mixed_precision=$precision" \
            "${DATA[@]}" "${SHORT[@]}"
        "${LAUNCH[@]}" train "recipes/$recipe.yaml" "run_dir=$run" "train.mixed_precision=$precision" \
            "${DATA[@]}" "${SHORT[@]}" "train.max_steps=$STEPS" resume=auto
        launcher ckpt export "$run/checkpoints/latest" --out "$run/model.safetensors" --force
    done
done
python bench/gpu_report.py "$OUT"/gpt_*

# The speed features: short runs, nothing but training (the rates past the first quarter of the rows).
SPEED=(
    "train.max_steps=$SPEED_STEPS" "scheduler.warmup_steps=10" "logging.every_steps=5" "eval.every_steps=null"
    "eval.every_epoch=false" "data.val=null" "early_stopping=null" "checkpoint.every_steps=null"
    "checkpoint.keep_best=0" "checkpoint.save_final=false" "train.mixed_precision=bf16" "strategy.timeout_s=300"
)
speed_runs=()
for compile in false true; do
    for recompute in none full; do
        run="$OUT/speed_compile-${compile}_ac-${recompute}"
        rm -rf "$run"
        echo "== gpt_ddp bf16, train.compile=$compile, train.activation_checkpointing=$recompute: $SPEED_STEPS steps"
        "${LAUNCH[@]}" train recipes/gpt_ddp.yaml "run_dir=$run" "${DATA[@]}" "${SPEED[@]}" \
            "train.compile=$compile" "train.activation_checkpointing=$recompute"
        speed_runs+=("$run")
    done
done
echo
python bench/gpu_report.py --speed "${speed_runs[@]}"
# Hugging Face: recipes/hf_causal_lm.yaml's tiny Llama in bf16 under FSDP (and ZeRO-3), saved, resumed and
# exported to the Hugging Face format, which transformers then loads (needs `datasets`: skipped without it).
if python -c "import datasets" 2>/dev/null; then
    for strategy in fsdp deepspeed; do
        run="$OUT/hf_${strategy}"
        rm -rf "$run"
        echo "== hf_causal_lm bf16, strategy $strategy on $GPUS GPU(s): $STEPS steps, saved and resumed halfway"
        HF=("data.dataset.path=../shared/data/tinyshakespeare.txt" "train.mixed_precision=bf16"
            "strategy.name=$strategy" "strategy.deepspeed.zero_stage=3" "eval.max_batches=5" "strategy.timeout_s=300")
        "${LAUNCH[@]}" train recipes/hf_causal_lm.yaml "run_dir=$run" "${HF[@]}" "train.max_steps=$((STEPS / 2))" \
            "checkpoint.every_steps=$((STEPS / 2))"
        "${LAUNCH[@]}" train recipes/hf_causal_lm.yaml "run_dir=$run" "${HF[@]}" "train.max_steps=$STEPS" resume=auto
        launcher ckpt export "$run/checkpoints/latest" --format hf --out "$run/export" --force
        python -c "from transformers import AutoModelForCausalLM as M; M.from_pretrained('$run/export').cuda()"
    done
    python bench/gpu_report.py "$OUT"/hf_*
else
    echo "== hf_causal_lm skipped: the datasets package is not installed here"
fi
# Tensor parallelism (needs 2 GPUs or more; NCCL takes one process per GPU): the GPT recipe in bf16 under FSDP2
# alone (tp 1), with strategy.tp=2 (a 2-D mesh of GPUs/2 data ranks x 2 where there are 4 GPUs or more) and with
# every GPU in one tensor-parallel group; tokens/s and peak memory per process (bench/gpu_report.py --speed), the
# same global batch per update in every run.
if [ "$GPUS" -ge 2 ]; then
    tp_runs=()
    tps=(1 2)
    if [ "$GPUS" -gt 2 ]; then tps+=("$GPUS"); fi
    for tp in "${tps[@]}"; do
        run="$OUT/tp_${tp}"
        rm -rf "$run"
        # Per data rank, batch x tp samples: every run's update sees 16 x GPUS samples.
        echo "== gpt_fsdp bf16, strategy.tp=$tp on $GPUS GPUs: $SPEED_STEPS steps"
        "${LAUNCH[@]}" train recipes/gpt_fsdp.yaml "run_dir=$run" "${DATA[@]}" "${SPEED[@]}" \
            "strategy.tp=$tp" "train.batch_size=$((16 * tp))" "train.gradient_accumulation_steps=1"
        tp_runs+=("$run")
    done
    python bench/gpu_report.py --speed "${tp_runs[@]}"
else
    echo "== tensor parallelism skipped: one GPU here (a tensor-parallel group needs a GPU per process)"
fi
# The launcher against a hand-written loop on the GPT-2 124M shape: one GPU, vocabulary 50304 whatever the tokens.
SIDE_OUT="$OUT/side_by_side" bench/side_by_side.sh "${1:-$OUT/tokens}" "$SIDE_STEPS"
[ "$SYNC_OK" = 1 ] || { echo "gpu_check: bench/sync_check.py found a host sync in a training step (above)"; exit 1; }

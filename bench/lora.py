"""python -m bench.lora: LoRA against full fine-tuning of the same Llama on the CPU, in bf16 autocast: updates per
second, peak memory (the process's peak RSS) and the size of a checkpoint (model state the launcher keeps plus
AdamW's state; for LoRA on a pretrained base, the adapters alone). Each mode runs in a fresh process, so that
one's peak is not the other's. Prints a Markdown table for docs/benchmarks.md's LoRA section.

    python -m bench.lora [--steps 20] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

LLAMA = {
    "vocab_size": 4096,
    "hidden_size": 256,
    "intermediate_size": 688,
    "num_hidden_layers": 4,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "max_position_embeddings": 128,
    "tie_word_embeddings": True,
}
BLOCK, BATCH = 128, 8
LORA = {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"]}


def run(mode: str, steps: int, threads: int) -> dict[str, float]:
    """One mode's figures, measured in this process."""
    import torch
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model("llama", **LLAMA))
    if mode == "lora":
        model = get_peft_model(model, LoraConfig(**LORA)).get_base_model()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, fused=True)
    ids = torch.randint(0, LLAMA["vocab_size"], (BATCH, BLOCK))

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(3):  # warm-up: the optimizer's state, the allocator's pools
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    seconds = time.perf_counter() - start
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    state = {k: v.contiguous() for k, v in model.state_dict().items() if mode == "full" or k in names}
    with tempfile.TemporaryDirectory() as tmp:
        save_file({k: v.clone() for k, v in state.items()}, f"{tmp}/model.safetensors")
        torch.save(optimizer.state_dict(), f"{tmp}/optimizer.pt")
        size = sum(f.stat().st_size for f in Path(tmp).iterdir())
    return {
        "steps_per_s": steps / seconds,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "checkpoint_mib": size / 2**20,
        "trainable": sum(p.numel() for p in params),
        "parameters": sum(p.numel() for p in model.parameters()),
    }


def cpu_name() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.is_file() else []
    names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    return names[0] if names else platform.processor() or platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--mode", choices=("full", "lora"), help=argparse.SUPPRESS)  # one child's run
    args = parser.parse_args()
    if args.mode:
        print(json.dumps(run(args.mode, args.steps, args.threads)))
        return
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    rows = {}
    for mode in ("full", "lora"):
        cmd = [
            sys.executable,
            "-m",
            "bench.lora",
            "--mode",
            mode,
            "--steps",
            str(args.steps),
            "--threads",
            str(args.threads),
        ]
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
        rows[mode] = json.loads(out.strip().splitlines()[-1])
    print(f"Machine: {cpu_name()}, {os.cpu_count()} cores; {args.threads} threads, {args.steps} updates\n")
    print("| fine-tuning | trainable parameters | updates/s | peak RSS | checkpoint (model + AdamW) |")
    print("| --- | --- | --- | --- | --- |")
    for mode, r in rows.items():
        print(
            f"| {mode} | {r['trainable']:,} of {r['parameters']:,} | {r['steps_per_s']:.2f} | "
            f"{r['peak_rss_mib']:.0f} MiB | {r['checkpoint_mib']:.2f} MiB |"
        )


if __name__ == "__main__":
    main()

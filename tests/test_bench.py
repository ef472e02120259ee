"""The benchmark harness runs (its figures are measured in bench/, never asserted here)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from conftest import REPO


def test_the_harness_runs_every_variant_and_puts_its_tables_between_the_markers(tmp_path: Path):
    out = tmp_path / "benchmarks.md"
    out.write_text(
        "# Benchmarks\n\nwritten by hand\n\n<!-- bench:begin -->\nold figures\n<!-- bench:end -->\n\nnotes\n"
    )
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--parts", "loops", "checkpoint", "--workloads", "a", "--processes", "1",
         "--quick", "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=400, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = out.read_text()
    assert text.startswith("# Benchmarks\n\nwritten by hand\n\n<!-- bench:begin -->\nMeasured ")
    assert text.endswith("<!-- bench:end -->\n\nnotes\n") and "old figures" not in text
    rows = [line.split(" | ")[0] for line in text.splitlines() if line.startswith("| ") and "---" not in line]
    loops = [row for row in rows if row in ("| PyTorch loop", "| Accelerate loop", "| `launcher train`")]
    assert loops == ["| PyTorch loop", "| Accelerate loop", "| `launcher train`"], text
    ways = [line for line in text.splitlines() if line.startswith(("| save | ", "| load | ")) and " s | " in line]
    assert len(ways) == 8, text  # 5 ways to save, 3 to load
    assert "| background (`checkpoint.async_save: true`) |" in text


def test_the_host_part_runs_workload_m_and_writes_its_section(tmp_path: Path):
    out = tmp_path / "benchmarks.md"
    out.write_text("<!-- bench:begin -->\nby hand\n<!-- bench:end -->\n")
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--parts", "host", "--quick", "--variants", "torch", "accelerate", "launcher",
         "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=400, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = out.read_text()
    assert "\n## Host time per update\n\n<!-- bench:host:begin -->\n" in text, text
    rows = [line.split(" | ")[0] for line in text.splitlines() if line.startswith("| ") and "---" not in line]
    assert [r for r in rows if r.startswith("| ") and r != "| variant"] == [
        "| PyTorch loop", "| Accelerate loop", "| `launcher train`"
    ], text  # fmt: skip
    assert "- against the Accelerate loop: " in text and "nan" not in text, text


def sync_check(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "bench.sync_check", *args], cwd=REPO, capture_output=True, text=True, timeout=300,
        check=False,
    )  # fmt: skip


def test_the_sync_check_says_when_there_is_no_cuda_and_its_logic_runs_on_the_cpu():
    import torch

    if not torch.cuda.is_available():
        plain = sync_check()
        assert plain.returncode == 0 and plain.stdout.startswith("sync_check: no CUDA here: skipped"), plain
    cpu = sync_check("--cpu")
    assert cpu.returncode == 0, cpu.stdout + cpu.stderr[-3000:]
    assert "sync_check: ok on cpu (host reads refused): 16 steady-state updates" in cpu.stdout
    # The check sees host reads: the host path (an optimizer that is not fused) reads every update's verdict.
    host = sync_check("--cpu", "optimizer.fused=false")
    assert host.returncode == 1, host.stdout + host.stderr[-3000:]
    assert "sync_check: FAILED on cpu (host reads refused), batches on the device: a host read" in host.stdout
    assert "consensus.py" in host.stdout


def test_saved_bytes_counts_each_storage_once_per_forward_and_every_forward_on_its_own():
    import torch

    from bench.saved_bytes import SavedBytes

    counts = SavedBytes()
    w = torch.randn(64, 64, requires_grad=True)  # 16 KiB: a matmul saves both operands
    with torch.autograd.graph.saved_tensors_hooks(counts.pack, counts.unpack):
        for batch in (8, 32):  # the second micro-batch is larger: the largest one is reported
            x = torch.randn(batch, 64, requires_grad=True)
            (x @ w).sum().backward()
            (w @ w).sum().backward()  # w saved twice in one op: one storage
    result = counts.result()
    assert result["forwards"] == 4, result
    assert result["saved_bytes"] == 32 * 64 * 4 + 64 * 64 * 4, result
    assert result["live_bytes"] >= result["saved_bytes"], result


def test_the_gpu_loop_and_its_side_by_side_report_run_on_the_cpu(tmp_path: Path):
    tokens = tmp_path / "tokens"
    tokens.mkdir()
    import numpy as np

    np.arange(5000, dtype=np.uint16).tofile(tokens / "train.bin")
    out = tmp_path / "side_loop_none" / "loop.json"
    loop = subprocess.run(
        [sys.executable, "-m", "bench.gpu_loop", "--tokens", str(tokens), "--out", str(out), "--tiny", "--device",
         "cpu", "--steps", "3", "--warmup", "1"],
        cwd=REPO, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert loop.returncode == 0, loop.stderr[-3000:]
    report = subprocess.run(
        [sys.executable, "bench/gpu_report.py", "--side-by-side", str(out.parent)],
        cwd=REPO, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert report.returncode == 0, report.stderr[-3000:]
    assert "| hand-written loop (bench/gpu_loop.py) | none | " in report.stdout and "| 1.00x |" in report.stdout

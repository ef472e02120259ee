"""PNG plots of one or more runs against step: loss (train solid, validation dashed with markers), learning
rate, gradient norm, throughput, model FLOP/s, MFU and peak memory, every run in each plot, for comparing them.
Needs matplotlib (the `plots` extra); nothing here imports it until a plot is drawn."""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from launcher.report import Run

INSTALL_HINT = "plots need matplotlib: pip install matplotlib (or the launcher's extra: pip install 'launcher[plots]')"

# (file, title, y label, [(metrics.jsonl key, line style, label suffix)])
PLOTS = (
    ("loss.png", "Loss", "loss", [("train/loss", "-", "train"), ("val/loss", "--o", "val")]),
    ("lr.png", "Learning rate", "lr", [("lr", "-", "")]),
    ("grad_norm.png", "Gradient norm (before clipping)", "global norm", [("grad_norm", "-", "")]),
    ("throughput.png", "Throughput (training only)", "samples/s", [("throughput/samples_per_s", "-", "")]),
    ("flops.png", "Model FLOP/s per process (training only)", "FLOP/s", [("flops_per_s", "-", "")]),
    ("mfu.png", "Model FLOPs utilisation", "MFU", [("mfu", "-", "")]),
    (
        "memory.png",
        "Peak memory per process",
        "GiB",
        [("memory/peak_gib", "-", "allocated"), ("memory/peak_reserved_gib", "--", "reserved")],
    ),
)
LOG_SCALE_ABOVE = 100.0  # a logarithmic y axis where the values drawn span more than this factor


def available() -> bool:
    return importlib.util.find_spec("matplotlib") is not None


def plot(runs: list[Run], out: Path, metrics: Sequence[str] = ()) -> list[Path]:
    """Draw every plot with at least one value into `out`, and one per key of `metrics` (`val/accuracy` ->
    `val_accuracy.png`: the metric a sweep ranks its runs by); the files written."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed, none opened
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    names = _labels(runs)
    written = []
    more = [(f"{m.replace('/', '_')}.png", m, m, [(m, "-o", "")]) for m in metrics]
    for file, title, ylabel, keys in [*PLOTS, *more]:
        fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
        drawn = 0
        for i, run in enumerate(runs):
            color = f"C{i % 10}"
            for key, style, suffix in keys:
                points = run.series(key)
                if not points:
                    continue
                steps, values = zip(*points, strict=True)
                label = " ".join(x for x in (names[i], suffix) if x)
                marker = "o" if "o" in style else None
                ax.plot(steps, values, style.replace("o", ""), color=color, marker=marker, markersize=3, label=label)
                drawn += 1
        if drawn:
            values = [v for run in runs for k, _, _ in keys for _, v in run.series(k)]
            if min(values) > 0 and max(values) / min(values) > LOG_SCALE_ABOVE:
                ax.set_yscale("log")
            ax.set_title(title)
            ax.set_xlabel("step")
            ax.set_ylabel(ylabel)
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize="small")
            fig.tight_layout()
            fig.savefig(out / file)
            written.append(out / file)
        plt.close(fig)
    return written


def _labels(runs: list[Run]) -> list[str]:
    """Run dir names, or their paths where two share a name."""
    names = [r.name for r in runs]
    return names if len(set(names)) == len(names) else [str(r.path) for r in runs]

"""`launcher report`: what a run did and what its curves say, read from its run dir alone: `metrics.jsonl` (every
logged value, one line per step, rolled back to the checkpoint a resumed attempt continued from), `recipe.yaml`,
`env.json`, `history.jsonl` (each attempt's start and end, restarts too), `last_run.json`, the checkpoints, under SLURM
`slurm/attempts.jsonl`, and the profiler's files in `profile/`."""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from launcher.diagnosis import MIN_TRAIN_POINTS, Curves, Finding, diagnose
from launcher.errors import RecipeError
from launcher.layout import (
    CHECKPOINTS_DIR,
    ENV_FILE,
    HISTORY_FILE,
    LAST_RUN_FILE,
    MEMORY_SNAPSHOT_SUFFIX,
    METRICS_FILE,
    PROFILE_DIR,
    RECIPE_FILE,
    ROLLED_BACK_FILE,
    SLURM_ATTEMPTS_FILE,
    TRACE_SUFFIX,
    is_interrupted_name,
    mesh_text,
    read_json,
    read_jsonl,
    recorded_split,
    restarts,
)
from launcher.storage import checkpoints_at


@dataclass
class Run:
    path: Path
    rows: list[dict[str, Any]]
    rolled_back: list[dict[str, Any]] = field(default_factory=list)  # logged by attempts after their checkpoint
    recipe: dict[str, Any] = field(default_factory=dict)
    env: dict[str, Any] = field(default_factory=dict)
    last_run: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    slurm_events: list[dict[str, Any]] = field(default_factory=list)
    checkpoints: list[int] = field(default_factory=list)
    best_checkpoints: list[list[float]] = field(default_factory=list)
    profile: list[str] = field(default_factory=list)  # trace and memory snapshot files in profile/

    @property
    def name(self) -> str:
        return self.path.name

    def series(self, key: str) -> list[tuple[int, float]]:
        """(step, value) of every row that logged `key` with a finite value."""
        return [
            (r["step"], float(r[key]))
            for r in self.rows
            if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])
        ]

    @property
    def skipped_steps(self) -> int:
        """Updates skipped for non-finite values, in all (the logged counter is cumulative)."""
        return max(
            (r["train/skipped_steps"] for r in self.rows if isinstance(r.get("train/skipped_steps"), int)), default=0
        )

    def curves(self) -> Curves:
        logged_norms = [r for r in self.rows if "grad_norm" in r]
        return Curves(
            train_loss=self.series("train/loss"),
            val_loss=self.series("val/loss"),
            lr=self.series("lr"),
            grad_norm=self.series("grad_norm"),
            skipped_steps=self.skipped_steps,
            nonfinite_grad_norms=sum(r["grad_norm"] is None for r in logged_norms),
            stop_reason=str(self.last_run.get("stop_reason", "")),
            clip_grad_norm=(self.recipe.get("train") or {}).get("clip_grad_norm"),
        )


def read_run(path: Path) -> Run:
    """Everything `report` shows of one run dir; RecipeError if it is not one."""
    if not path.is_dir():
        raise RecipeError(f"{path}: no such run dir")
    metrics = path / METRICS_FILE
    if not metrics.is_file():
        raise RecipeError(
            f"{path}: no {METRICS_FILE}; not a run dir, or a run logged without the jsonl tracker (logging.trackers)"
        )
    run = Run(path=path, rows=read_jsonl(metrics), rolled_back=read_jsonl(path / ROLLED_BACK_FILE))
    recipe_file = path / RECIPE_FILE
    if recipe_file.is_file():
        try:
            run.recipe = yaml.safe_load(recipe_file.read_text()) or {}
        except yaml.YAMLError:
            run.recipe = {}
    run.env = read_json(path / ENV_FILE)
    run.last_run = read_json(path / LAST_RUN_FILE)
    run.history = read_jsonl(path / HISTORY_FILE)
    run.slurm_events = read_jsonl(path / "slurm" / SLURM_ATTEMPTS_FILE)
    run.checkpoints, state = checkpoints_at((run.recipe.get("checkpoint") or {}).get("dir") or path / CHECKPOINTS_DIR)
    run.best_checkpoints = state.get("best_checkpoints") or []
    run.profile = profile_files(path / PROFILE_DIR)
    return run


def profile_files(folder: Path) -> list[str]:
    """The traces and memory snapshots the profiler wrote, by name (not one it was still writing)."""
    if not folder.is_dir():
        return []
    names = [f.name for f in folder.iterdir() if not is_interrupted_name(f.name)]
    return sorted(n for n in names if n.endswith((TRACE_SUFFIX, MEMORY_SNAPSHOT_SUFFIX)))


# ---------------------------------------------------------------------------------------------------- facts


def hyperparameters(recipe: dict[str, Any], env: dict[str, Any]) -> list[tuple[str, str]]:
    """The recipe's key settings, as (name, value) pairs (none without a recipe)."""
    if not recipe:
        return []
    train = recipe.get("train") or {}
    out = [
        ("model", _component(recipe.get("model"))),
        ("optimizer", _component(recipe.get("optimizer"))),
        ("scheduler", _component(recipe.get("scheduler"))),
        ("batch size", _batch(train, env)),
        ("length", _length(train)),
        ("clip_grad_norm", str(train.get("clip_grad_norm"))),
        ("mixed precision", str(train.get("mixed_precision", "no"))),
        ("strategy", f"{(recipe.get('strategy') or {}).get('name', 'ddp')}, {_processes(env)}"),
        ("seed", str(train.get("seed"))),
    ]
    return [(k, v) for k, v in out if v not in ("", "None")]


def _component(spec: Any) -> str:
    if not isinstance(spec, dict):
        return "" if spec is None else str(spec)
    name = spec.get("_component_", "?")
    kwargs = ", ".join(f"{k}={_short(v)}" for k, v in spec.items() if k != "_component_")
    return f"{name}({kwargs})"


def _short(value: Any) -> str:
    text = json.dumps(value) if isinstance(value, (list, dict)) else str(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _processes(env: dict[str, Any]) -> str:
    world, ranks = recorded_split(env, "?")
    return f"{world} process(es){mesh_text(world, ranks)}"


def _batch(train: dict[str, Any], env: dict[str, Any]) -> str:
    size, accumulation = train.get("batch_size"), train.get("gradient_accumulation_steps", 1) or 1
    world = recorded_split(env)[1]  # the processes reading different batches
    if size is None:
        return ""
    text = f"{size} per process" + (f" x {accumulation} accumulated" if accumulation > 1 else "")
    return text + (f" = {size * accumulation * world} per update" if isinstance(world, int) else "")


def _length(train: dict[str, Any]) -> str:
    parts = [f"{k}={train[k]}" for k in ("max_steps", "max_epochs", "max_time_s") if train.get(k) is not None]
    return ", ".join(parts)


@dataclass(frozen=True)
class Attempt:
    end_step: int | None
    seconds: float | None
    stop_reason: str  # "" if it left no end (killed, crashed)


def attempts(history: list[dict[str, Any]], rows: list[dict[str, Any]]) -> list[Attempt]:
    """Each attempt's steps and time, from the history; one that left no end line (it was killed, or failed)
    ends at the last metrics row it logged (`rows` with the rolled-back ones: the time was spent)."""
    starts = [i for i, e in enumerate(history) if e.get("event") == "start"]
    out = []
    for n, i in enumerate(starts):
        start = history[i]
        following = history[i + 1 : starts[n + 1] if n + 1 < len(starts) else len(history)]
        end = next((e for e in following if e.get("event") == "end"), None)
        begin = float(start.get("time", 0.0))
        if end is not None:
            out.append(Attempt(end.get("step"), end["time"] - begin, end.get("stop_reason", "")))
            continue
        until = float(history[starts[n + 1]]["time"]) if n + 1 < len(starts) else math.inf
        during = [r for r in rows if isinstance(r.get("time"), (int, float)) and begin <= r["time"] < until]
        last = max(during, key=lambda r: r["time"]) if during else None
        out.append(Attempt(last["step"] if last else None, (last["time"] - begin) if last else None, ""))
    return out


def summary(run: Run) -> dict[str, Any]:
    """The facts `report` prints, as plain values (also what `--json` writes)."""
    rows = run.rows
    last_step = max((r["step"] for r in rows if isinstance(r.get("step"), int)), default=0)
    epochs = [r["epoch"] for r in rows if isinstance(r.get("epoch"), (int, float))]
    checkpoint = run.recipe.get("checkpoint") or {}
    monitor, mode = checkpoint.get("monitor", "val/loss"), checkpoint.get("mode", "min")
    val_loss = run.series("val/loss")
    train_loss = run.series("train/loss")
    samples = [v for _, v in run.series("throughput/samples_per_s")]
    tokens = [v for _, v in run.series("throughput/tokens_per_s")]
    tries = attempts(run.history, rows + run.rolled_back)
    # How the run ended: the last attempt's end line, if it wrote one (last_run.json may be an earlier attempt's).
    ended = tries[-1].stop_reason if tries else run.last_run.get("stop_reason")
    if tries and tries[-1].end_step is not None and tries[-1].stop_reason:
        last_step = max(last_step, tries[-1].end_step)
    seconds = [a.seconds for a in tries if a.seconds is not None]
    times = [r["time"] for r in rows if isinstance(r.get("time"), (int, float))]
    out: dict[str, Any] = {
        "run_dir": str(run.path),
        "name": run.recipe.get("name") or run.name,
        "steps": last_step,
        "total_steps": run.last_run.get("total_steps"),
        "epochs": round(epochs[-1], 3) if epochs else None,
        "stop_reason": ended or None,
        "final_train_loss": train_loss[-1][1] if train_loss else None,
        "final_val_loss": val_loss[-1][1] if val_loss else None,
        "best_val_loss": best_point(val_loss, "min"),
        "monitor": monitor,
        "best_monitor": best_point(run.series(monitor), mode) if monitor != "val/loss" else None,
        "samples_per_s": statistics.median(samples) if samples else None,
        "tokens_per_s": statistics.median(tokens) if tokens else None,
        "train_seconds": sum(seconds) if seconds else (times[-1] - times[0] if len(times) > 1 else None),
        "attempts": len(tries) or None,
        "resumes": max(len(tries) - 1, 0),
        "restarts": restarts(run.history),  # by the elastic agent, within the attempts
        "requeues": sum(e.get("event") == "requeue" for e in run.slurm_events),
        "checkpoints": run.checkpoints,
        "best_checkpoints": [int(s) for s, _ in run.best_checkpoints],
        "skipped_steps": run.skipped_steps,
        **compute(run),
        "profile": [str(run.path / PROFILE_DIR / name) for name in run.profile],
    }
    return out


def compute(run: Run) -> dict[str, Any]:
    """Model FLOP/s and MFU per process (mean over the logged rows and the last one) and the peak memory."""
    out: dict[str, Any] = {}
    for key in ("flops_per_s", "mfu"):
        values = [v for _, v in run.series(key)]
        out[key] = {"mean": statistics.fmean(values), "last": values[-1]} if values else None
    for key, name in (("memory/peak_gib", "peak_memory_gib"), ("memory/peak_reserved_gib", "peak_reserved_gib")):
        values = [v for _, v in run.series(key)]
        out[name] = max(values) if values else None
    out["flops_per_update"] = run.env.get("flops_per_update")
    return out


def best_point(series: list[tuple[int, float]], mode: str) -> dict[str, float] | None:
    """The series' best point by `mode`, as {step, value}; None for an empty series."""
    if not series:
        return None
    step, value = (min if mode == "min" else max)(series, key=lambda p: p[1])
    return {"step": step, "value": value}


# ---------------------------------------------------------------------------------------------------- text


def render(run: Run, s: dict[str, Any], findings: list[Finding]) -> str:
    """The report of one run: its `summary` and its findings, as text."""
    lines = [f"run {s['name']}  ({run.path})", ""]
    settings = hyperparameters(run.recipe, run.env)
    width = max((len(k) for k, _ in settings), default=0)
    lines.extend(f"  {key:<{width}}  {value}" for key, value in settings)
    lines.append("" if settings else "  (no recipe.yaml: settings unknown)\n")
    lines.extend(_figures(s))
    lines.append("")
    lines.extend(_diagnosis(len(run.series("train/loss")), findings))
    return "\n".join(lines)


def _figures(s: dict[str, Any]) -> list[str]:
    """The run's figures, a line each: progress, losses, throughput, time, attempts, checkpoints."""
    total = f"/{s['total_steps']}" if s["total_steps"] else ""
    epochs = f", {s['epochs']:g} epochs" if s["epochs"] is not None else ""
    ended = (
        f"; ended: {s['stop_reason']}"
        if s["stop_reason"]
        else "; no end recorded (still running, or stopped by a kill or an error)"
    )
    lines = [f"  progress      step {s['steps']}{total}{epochs}{ended}"]
    lines.append(f"  train/loss    {_num(s['final_train_loss'])} at the end")
    if s["final_val_loss"] is not None:
        best = s["best_val_loss"]
        at_end = _num(s["final_val_loss"])
        lines.append(f"  val/loss      {at_end} at the end; best {_num(best['value'])} at step {best['step']}")
    if s["best_monitor"]:
        best = s["best_monitor"]
        lines.append(f"  {s['monitor']:<13} best {_num(best['value'])} at step {best['step']}")
    if s["skipped_steps"]:
        lines.append(f"  skipped       {s['skipped_steps']} update(s) with a non-finite loss or gradient norm")
    speed = []
    if s["samples_per_s"] is not None:
        speed.append(f"{s['samples_per_s']:,.0f} samples/s")
    if s["tokens_per_s"] is not None:
        speed.append(f"{s['tokens_per_s']:,.0f} tokens/s")
    if speed:
        lines.append(f"  throughput    {', '.join(speed)} (median of the logged values)")
    lines.extend(_compute_lines(s))
    if s["train_seconds"] is not None:
        lines.append(f"  time          {_duration(s['train_seconds'])} of training")
    if s["attempts"]:
        restarts, requeues = f"{s['restarts']} restart(s) after a failure", f"{s['requeues']} SLURM requeue(s)"
        lines.append(f"  attempts      {s['attempts']} ({s['resumes']} resume(s): {restarts}, {requeues})")
    ckpts = s["checkpoints"]
    if ckpts:
        best = f"; best: {', '.join(map(str, s['best_checkpoints']))}" if s["best_checkpoints"] else ""
        lines.append(f"  checkpoints   {len(ckpts)} at step(s) {', '.join(map(str, ckpts))}{best}")
    else:
        lines.append("  checkpoints   none")
    return lines + _profile(s["profile"])


def _profile(paths: list[str]) -> list[str]:
    """The profiler's files, and how to open them."""
    if not paths:
        return []
    folder = str(Path(paths[0]).parent)
    traces = [Path(p).name for p in paths if p.endswith(TRACE_SUFFIX)]
    snapshots = [Path(p).name for p in paths if p.endswith(MEMORY_SNAPSHOT_SUFFIX)]
    lines = [f"  profile       {', '.join(traces + snapshots)} in {folder}/"]
    hints = []
    if traces:
        hints.append(f"open a trace at https://ui.perfetto.dev, or: tensorboard --logdir {folder} (torch-tb-profiler)")
    if snapshots:
        hints.append("a memory snapshot at https://pytorch.org/memory_viz")
    lines.append(f"                {'; '.join(hints)}")
    return lines


def _compute_lines(s: dict[str, Any]) -> list[str]:
    lines = []
    flops, mfu = s.get("flops_per_s"), s.get("mfu")
    if flops:
        text = f"  compute       {_tflops(flops['mean'])} per process (mean; last {_tflops(flops['last'])})"
        if mfu:
            text += f", MFU {100 * mfu['mean']:.3g}% (last {100 * mfu['last']:.3g}%)"
        lines.append(text)
    if s.get("peak_memory_gib") is not None:
        reserved = s.get("peak_reserved_gib")
        more = f", {reserved:.2f} GiB reserved" if reserved is not None else ""
        lines.append(f"  memory        peak {s['peak_memory_gib']:.2f} GiB{more} per process")
    return lines


def _tflops(value: float) -> str:
    scale, unit = next(((s, u) for s, u in ((1e12, "T"), (1e9, "G"), (1e6, "M")) if value >= s), (1.0, ""))
    return f"{value / scale:.3g} {unit}FLOP/s"


def _diagnosis(logged: int, findings: list[Finding]) -> list[str]:
    lines = []
    if not findings and logged < MIN_TRAIN_POINTS:
        lines.append(f"diagnosis: too few training losses logged to judge ({logged}; needs {MIN_TRAIN_POINTS})")
    elif not findings:
        lines.append("diagnosis: nothing wrong found in the curves")
    for f in findings:
        lines.append(f"diagnosis: {f.title}")
        lines.extend(f"  - {e}" for e in f.evidence)
        if f.suggestions:
            lines.append("  try: " + "; ".join(f.suggestions))
    return lines


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


def _duration(seconds: float) -> str:
    if seconds < 10:
        return f"{seconds:.1f}s"
    h, rest = divmod(round(seconds), 3600)
    m, s = divmod(rest, 60)
    return f"{h}h {m:02d}m {s:02d}s" if h else f"{m}m {s:02d}s" if m else f"{s}s"


def report(paths: list[Path]) -> tuple[list[Run], str, list[dict[str, Any]]]:
    """Read every run dir first (a bad one is refused before anything is printed or drawn)."""
    runs = [read_run(p) for p in paths]
    texts, records = [], []
    for run in runs:
        facts, findings = summary(run), diagnose(run.curves())
        texts.append(render(run, facts, findings))
        records.append({**facts, "findings": [f.__dict__ for f in findings]})
    return runs, "\n\n".join(texts), records

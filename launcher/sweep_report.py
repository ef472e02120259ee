"""`launcher report SWEEP_DIR`: the runs of a sweep in one table, ranked by the monitored metric (the recipe's
`checkpoint.monitor`/`mode`, else early stopping's, else val/loss, lower better), the best value each run reached;
runs that have not ended (still running, stopped, crashed) after those that did, and runs with no value last."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from launcher import report as run_report
from launcher import sweep
from launcher.errors import RecipeError
from launcher.layout import METRICS_FILE

FINISHED = ("done", "early stopping")  # the runs ranked first: those that ran to their end


def report(paths: list[Path]) -> tuple[list[run_report.Run], str, Any, list[str]]:
    """`launcher report`'s runs, text and records, and the metrics to plot beyond the usual ones: a sweep dir's
    table (given alone), or the runs' own reports."""
    sweeps = [p for p in paths if sweep.is_sweep(p)]
    if not sweeps:
        return (*run_report.report(paths), [])
    if len(paths) > 1:
        raise RecipeError(f"{sweeps[0]}: a sweep dir; report it alone: launcher report {sweeps[0]}")
    return sweep_report(sweeps[0])


def sweep_report(sweep_dir: Path) -> tuple[list[run_report.Run], str, dict[str, Any], list[str]]:
    found = sweep.read_sweep(sweep_dir)
    tasks = found["tasks"]
    runs: dict[int, run_report.Run] = {
        t["index"]: run_report.read_run(Path(t["run_dir"]))
        for t in tasks
        if (Path(t["run_dir"]) / METRICS_FILE).is_file()
    }
    first = next(iter(runs.values()), None)
    metric, mode = sweep.monitor(first.recipe if first else {})
    rows = [row(t, runs.get(t["index"]), metric, mode) for t in tasks]
    ranked = rank(rows, mode)
    text = render(sweep_dir, ranked, list(found.get("axes") or {}), metric, mode)
    records = {"sweep_dir": str(sweep_dir), "monitor": metric, "mode": mode, "runs": ranked}
    plotted = [metric] if metric not in ("val/loss", "train/loss") else []
    return list(runs.values()), text, records, plotted


def row(task: dict[str, Any], run: run_report.Run | None, metric: str, mode: str) -> dict[str, Any]:
    """What the table shows of one task's run (None: it has logged nothing yet)."""
    out: dict[str, Any] = {"task": task["index"], "overrides": task["overrides"], "run_dir": task["run_dir"]}
    if run is None:
        return {**out, "best": None, "last": None, "steps": None, "stop_reason": None, "requeues": 0, "attempts": 0}
    facts = run_report.summary(run)
    series = run.series(metric)
    return {
        **out,
        "best": run_report.best_point(series, mode),
        "last": series[-1][1] if series else None,
        "steps": facts["steps"],
        "total_steps": facts["total_steps"],
        "stop_reason": facts["stop_reason"],
        "requeues": facts["requeues"],
        "attempts": facts["attempts"] or 0,
    }


def rank(rows: list[dict[str, Any]], mode: str) -> list[dict[str, Any]]:
    """Finished runs with a value first, best first; then unfinished ones with a value; then runs with none. Ties
    keep the tasks' order."""
    sign = 1 if mode == "min" else -1

    def key(r: dict[str, Any]) -> tuple[int, float, int]:
        if r["best"] is None:
            return (2, 0.0, r["task"])
        return (0 if r["stop_reason"] in FINISHED else 1, sign * r["best"]["value"], r["task"])

    return [{**r, "rank": n} for n, r in enumerate(sorted(rows, key=key), 1)]


def render(sweep_dir: Path, ranked: list[dict[str, Any]], keys: list[str], metric: str, mode: str) -> str:
    better = "lower" if mode == "min" else "higher"
    names = sweep.short_keys(keys)
    head = ["rank", "task", *[names[k] for k in keys], f"best {metric}", "at step", "steps", "ended", "requeues"]
    table = [head]
    for r in ranked:
        best = r["best"]
        steps = (
            "-" if r["steps"] is None else f"{r['steps']}" + (f"/{r['total_steps']}" if r.get("total_steps") else "")
        )
        ended = r["stop_reason"] or ("not started" if r["steps"] is None else "not ended")
        table.append(
            [
                str(r["rank"]),
                str(r["task"]),
                *[str(r["overrides"].get(k, "")) for k in keys],
                "-" if best is None else f"{best['value']:.4g}",
                "-" if best is None else str(best["step"]),
                steps,
                ended,
                str(r["requeues"]),
            ]
        )
    widths = [max(len(line[i]) for line in table) for i in range(len(head))]
    lines = [f"sweep {sweep_dir}: {len(ranked)} run(s) ranked by the best {metric} ({better} is better)", ""]
    lines += ["  " + "  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip() for line in table]
    top = ranked[0]
    if top["best"] is not None:
        combo = " ".join(sweep.as_overrides(top["overrides"]))
        lines += ["", f"best: task {top['task']} ({combo}), {metric} {top['best']['value']:.4g}: {top['run_dir']}"]
    unfinished = sum(1 for r in ranked if r["stop_reason"] not in FINISHED)
    if unfinished:
        lines.append(
            f"{unfinished} run(s) not done yet (ranked after the finished ones): launcher slurm status {sweep_dir}"
        )
    return "\n".join(lines)

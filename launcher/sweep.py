"""`launcher slurm sweep`: one SLURM job array over the cross product of override values (`optimizer.lr=1e-4,3e-4`),
one task per combination, each with its own run dir under one sweep dir, and `launcher slurm status SWEEP_DIR`.

Every combination is checked as `launcher slurm submit` checks one recipe before anything is written or submitted.
The sweep dir holds `sweep.json` (the recipe, the combinations, each task's run dir and the array jobs), the job
script and the tasks' logs in `slurm/`, and one run dir per task. Each task picks its combination by
`$SLURM_ARRAY_TASK_ID` and runs the job script of `slurm submit` with `run_dir=` its own dir and `resume=auto`, so a
requeued task continues its own run; it requeues itself as `<array job>_<index>`.
"""

from __future__ import annotations

import itertools
import json
import re
import shlex
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from launcher import slurm
from launcher.errors import RecipeError
from launcher.layout import LAST_RUN_FILE, METRICS_FILE, RECIPE_FILE, SLURM_ATTEMPTS_FILE, read_json, read_jsonl

if TYPE_CHECKING:
    from launcher.recipe import Recipe

SWEEP_FILE = "sweep.json"
SCRIPT_FILE = "sweep.sbatch"
DEFAULT_MAX_ARRAY_SIZE = 1001  # SLURM's MaxArraySize unless the cluster sets another: indices 0 to 1000
ENDED = ("done", "early stopping", "diverged")  # a run that ended for good; the job script requeues none of them
_PAIRS = {"[": "]", "{": "}", "(": ")"}
_UNSAFE = re.compile(r"[^A-Za-z0-9._=+-]+")
NAME_CHARS = 60  # the combination's part of a run dir's name, at most


@dataclass(frozen=True)
class Axis:
    key: str
    values: tuple[str, ...]  # as the user wrote them: each is read as YAML by the recipe, as an override is


def split_values(text: str) -> list[str]:
    """`1e-4,3e-4` -> ['1e-4', '3e-4']; commas inside [..], {..}, (..) or quotes do not split (`[64,64]` is one)."""
    items, depth, quote, start = [], 0, "", 0
    for i, c in enumerate(text):
        if quote:
            quote = "" if c == quote else quote
        elif c in "\"'":
            quote = c
        elif c in _PAIRS:
            depth += 1
        elif c in _PAIRS.values():
            depth = max(depth - 1, 0)
        elif c == "," and depth == 0:
            items.append(text[start:i])
            start = i + 1
    return [*items, text[start:]]


def parse(overrides: Sequence[str]) -> tuple[list[str], list[Axis]]:
    """The fixed overrides and the swept axes (`key=a,b`); RecipeError for a key given twice, an empty value in a
    list, a value given twice, a swept `slurm.*` key or a `run_dir`, which the sweep sets for each task."""
    fixed: list[str] = []
    axes: list[Axis] = []
    seen: set[str] = set()
    problems = []
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        if key.lstrip("~") in seen:
            problems.append(f"{key.lstrip('~')}: given twice; give each key once, its values as a list: {key}=a,b")
        seen.add(key.lstrip("~"))
        if key == "run_dir":
            problems.append("run_dir: set by the sweep for each task (SWEEP_DIR/<task>); use --sweep-dir instead")
            continue
        values = split_values(text) if sep else [text]
        if not sep or len(values) == 1:
            fixed.append(item)
            continue
        if any(not v.strip() for v in values):
            problems.append(f"{key}: an empty value in the list {text!r}; expected values such as {key}=a,b")
        elif len(set(values)) < len(values):
            twice = next(v for v in values if values.count(v) > 1)
            problems.append(f"{key}: the value {twice!r} is given twice in {text!r}")
        elif key.split(".")[0] == "slurm":
            problems.append(f"{key}: the tasks of a sweep share one job array and its resources; give one value")
        else:
            axes.append(Axis(key, tuple(values)))
    if problems:
        raise RecipeError(problems)
    return fixed, axes


def combinations(axes: Sequence[Axis]) -> list[dict[str, str]]:
    """The cross product, the first axis varying slowest: task i runs combinations(axes)[i]."""
    return [
        dict(zip([a.key for a in axes], values, strict=True)) for values in itertools.product(*[a.values for a in axes])
    ]


def as_overrides(combination: dict[str, str]) -> list[str]:
    return [f"{key}={value}" for key, value in combination.items()]


def short_keys(keys: Sequence[str]) -> dict[str, str]:
    """Each key by its last part (`optimizer.lr` -> `lr`), or in full where two share that part."""
    last = [k.split(".")[-1] for k in keys]
    return {k: (s if last.count(s) == 1 else k) for k, s in zip(keys, last, strict=True)}


def task_name(index: int, count: int, combination: dict[str, str]) -> str:
    """A task's run dir name: its index, padded so that the names sort in order, and the combination in short:
    `0-lr=1e-4-batch_size=16`. Characters a shell or a path would trip on become `_`."""
    names = short_keys(list(combination))
    text = "-".join(f"{names[k]}={v}" for k, v in combination.items())
    return f"{index:0{len(str(count - 1))}d}-{_UNSAFE.sub('_', text)[:NAME_CHARS]}"


def array_spec(indices: Sequence[int], max_parallel: int | None) -> str:
    """sbatch's --array: ranges of consecutive indices (`0-3`, `1,3-5`), `%K` for at most K tasks at a time."""
    parts, ordered = [], sorted(indices)
    for _, group in itertools.groupby(enumerate(ordered), key=lambda p: p[1] - p[0]):
        run = [i for _, i in group]
        parts.append(str(run[0]) if len(run) == 1 else f"{run[0]}-{run[-1]}")
    return ",".join(parts) + (f"%{max_parallel}" if max_parallel else "")


def count_problems(count: int, max_array_size: int, max_parallel: int | None) -> list[str]:
    problems = []
    if count < 2:
        problems.append(
            f"a sweep needs at least two combinations, got {count}: give a key several values (optimizer.lr=1e-4,3e-4),"
            " or run one with `launcher slurm submit`"
        )
    if count > max_array_size:
        problems.append(
            f"{count} combinations: more than the {max_array_size} tasks a job array may have (MaxArraySize)"
        )
    if max_parallel is not None and max_parallel < 1:
        problems.append(f"--max-parallel: must be >= 1, got {max_parallel}")
    return problems


def max_array_size() -> int:
    """The cluster's MaxArraySize (`scontrol show config`), or SLURM's default where that cannot be asked."""
    scontrol = shutil.which("scontrol")
    if scontrol is None:
        return DEFAULT_MAX_ARRAY_SIZE
    try:
        proc = subprocess.run([scontrol, "show", "config"], capture_output=True, text=True, timeout=20, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return DEFAULT_MAX_ARRAY_SIZE
    found = re.search(r"^MaxArraySize\s*=\s*(\d+)", proc.stdout, re.M)
    return int(found.group(1)) if found and proc.returncode == 0 else DEFAULT_MAX_ARRAY_SIZE


def monitor(recipe: dict[str, Any]) -> tuple[str, str]:
    """The metric the runs of a sweep are ranked by, and whether lower or higher is better: the checkpoints' where the
    recipe keeps its best ones or names a metric for them, else early stopping's, else val/loss, lower better."""
    ckpt, stop = recipe.get("checkpoint") or {}, recipe.get("early_stopping") or {}
    if ckpt.get("keep_best") or ckpt.get("monitor", "val/loss") != "val/loss" or not stop:
        return str(ckpt.get("monitor") or "val/loss"), str(ckpt.get("mode") or "min")
    return str(stop.get("monitor") or "val/loss"), str(stop.get("mode") or "min")


@dataclass(frozen=True)
class Request:
    """`launcher slurm sweep RECIPE overrides [flags]`."""

    recipe: str
    overrides: tuple[str, ...]
    flags: dict[str, Any]  # --nodes, --gpus-per-node, --time, --partition, --account (None: the recipe's)
    max_parallel: int | None = None
    sweep_dir: str | None = None
    resume: bool = False
    dry_run: bool = False


def check_all(recipe: str, fixed: list[str], combos: list[dict[str, str]]) -> list[Recipe]:
    """Every combination's recipe, checked as `slurm submit` checks one; RecipeError with each distinct problem once,
    naming the first task it was found in (a bad value fails every combination it is in)."""
    from launcher.recipe import load_recipe

    recipes, found = [], {}
    for i, combo in enumerate(combos):
        try:
            recipes.append(load_recipe(recipe, [*fixed, *as_overrides(combo)], this_machine=False))
        except RecipeError as e:
            for problem in e.problems:
                found.setdefault(problem, f"task {i} ({' '.join(as_overrides(combo))}): {problem}")
    if found:
        raise RecipeError(list(found.values()))
    return recipes


def read_sweep(sweep_dir: Path) -> dict[str, Any]:
    found = read_json(sweep_dir / SWEEP_FILE)
    if not found.get("tasks"):
        raise RecipeError(f"{sweep_dir}: not a sweep dir (no {SWEEP_FILE})")
    return found


def is_sweep(path: Path) -> bool:
    return (path / SWEEP_FILE).is_file()


def ended(run_dir: Path) -> str | None:
    """How the run ended for good (done, early stopping, diverged); None where it may go on."""
    reason = read_json(run_dir / LAST_RUN_FILE).get("stop_reason")
    return reason if reason in ENDED else None


def to_submit(sweep_dir: Path, tasks: list[dict[str, Any]], resume: bool) -> list[int]:
    """The tasks to submit: all of a new sweep; with --resume, those of the same sweep that have not ended and are
    not in the queue any more. RecipeError where the sweep dir does not allow it."""
    if not is_sweep(sweep_dir):
        if resume:
            raise RecipeError(f"--resume: {sweep_dir} holds no sweep (no {SWEEP_FILE})")
        if sweep_dir.exists() and (not sweep_dir.is_dir() or any(sweep_dir.iterdir())):
            raise RecipeError(f"--sweep-dir: {sweep_dir} exists and is not an empty folder; pick another")
        return [t["index"] for t in tasks]
    if not resume:
        raise RecipeError(
            f"{sweep_dir}: holds a sweep already (launcher slurm status {sweep_dir}); pass --resume to continue its "
            "unfinished tasks, or pick another --sweep-dir"
        )
    before = read_sweep(sweep_dir)["tasks"]
    if [t["overrides"] for t in before] != [t["overrides"] for t in tasks]:
        raise RecipeError(f"--resume: not the combinations of the sweep in {sweep_dir}; give the same keys and values")
    left = []
    for t in before:
        submitted = (Path(t["run_dir"]) / "slurm" / SLURM_ATTEMPTS_FILE).is_file()
        info = slurm.status(Path(t["run_dir"])) if submitted else {"state": None}
        if info["state"] in ("PENDING", "RUNNING", "REQUEUED", "SUSPENDED", "COMPLETING", "CONFIGURING"):
            raise RecipeError(f"--resume: task {t['index']} is still in the queue (job {info['job']}, {info['state']})")
        if ended(Path(t["run_dir"])) is None:
            left.append(t["index"])
    if not left:
        raise RecipeError(f"--resume: every task of {sweep_dir} has ended (done, early stopping or diverged)")
    return left


def render(
    req: Request, fixed: list[str], tasks: list[dict[str, Any]], array: str, options: slurm.JobOptions, name: str
) -> str:
    """The array's job script: `slurm submit`'s, with each task's recipe arguments and run dir chosen by its index."""
    cases = []
    for t in tasks:
        args = [req.recipe, *fixed, *as_overrides(t["overrides"]), f"run_dir={t['run_dir']}"]
        args += [f"checkpoint.dir={t['checkpoint_dir']}"] if t.get("checkpoint_dir") else []
        quoted = " ".join(shlex.quote(a) for a in args)
        cases.append(f"    {t['index']}) TRAIN_ARGS=({quoted}); RUN_DIR={shlex.quote(t['run_dir'])} ;;")
    args_lines = [
        'case "${SLURM_ARRAY_TASK_ID:-}" in  # this task\'s combination',
        *cases,
        '    *) echo "launcher: this sweep has no task ${SLURM_ARRAY_TASK_ID:-(not a job array)}" >&2; exit 2 ;;',
        "esac",
    ]
    sweep_dir = Path(tasks[0]["run_dir"]).parent
    header = slurm.header(options, name, f"{sweep_dir}/slurm/%A_%a.out", array)
    about = "# Generated by `launcher slurm sweep`: a job array, one task per combination."
    return slurm.script(header, args_lines, options, about, shlex.quote(str(Path.cwd())), slurm.python_executable())


def submit(req: Request) -> int:
    """Check every combination, then write the sweep dir and submit the array (or print its script)."""
    fixed, axes = parse(req.overrides)
    combos = combinations(axes)
    problems = count_problems(len(combos), max_array_size(), req.max_parallel)
    if problems:
        raise RecipeError(problems)
    recipes = check_all(req.recipe, fixed, combos)
    options = slurm.job_options(recipes[0].slurm, **req.flags)  # (slurm.* is never swept: the same for all)
    problems = slurm.options_problems(options)
    if problems:
        raise RecipeError(problems)
    sweep_dir = Path(req.sweep_dir or f"{recipes[0].run_dir}-sweep").resolve()
    tasks = [
        {"index": i, "overrides": c, "run_dir": str(sweep_dir / task_name(i, len(combos), c))}
        for i, c in enumerate(combos)
    ]
    shared = recipes[0].checkpoint.dir  # a folder or storage prefix the recipe names: each task a folder in it
    if shared and all(r.checkpoint.dir == shared for r in recipes):
        for t in tasks:
            t["checkpoint_dir"] = f"{shared.rstrip('/')}/{Path(t['run_dir']).name}"
    indices = to_submit(sweep_dir, tasks, req.resume)
    array = array_spec(indices, req.max_parallel)
    script = render(req, fixed, tasks, array, options, f"{recipes[0].name}-sweep")
    if req.dry_run:
        print(script, end="")
        return 0
    sbatch = slurm.find_sbatch()  # before anything is written
    slurm.check_nodes(options)
    new = not is_sweep(sweep_dir)
    (sweep_dir / "slurm").mkdir(parents=True, exist_ok=True)  # before the tasks start: their logs go there
    path = sweep_dir / "slurm" / SCRIPT_FILE
    path.write_text(script)
    try:
        job = slurm.submit(sbatch, path)
    except RecipeError:
        if new:  # (empty or absent before: to_submit checked) a half-made sweep dir would refuse the next try
            shutil.rmtree(sweep_dir)
        raise
    for i in indices:
        (Path(tasks[i]["run_dir"]) / "slurm").mkdir(parents=True, exist_ok=True)
        slurm.record_submit(Path(tasks[i]["run_dir"]), f"{job}_{i}")
    record(sweep_dir, req, fixed, axes, tasks, {"job": job, "array": array})
    print(f"submitted job array {job} ({array}): {len(indices)} task(s) of {recipes[0].name}; logs {path.parent}/")
    print(f"  launcher slurm status {sweep_dir}\n  launcher report {sweep_dir}")
    return 0


def record(
    sweep_dir: Path, req: Request, fixed: list[str], axes: list[Axis], tasks: list[dict[str, Any]], job: dict[str, str]
) -> None:
    """sweep.json, with every array job submitted for it (a --resume adds one)."""
    before = read_json(sweep_dir / SWEEP_FILE).get("jobs", [])
    sweep = {
        "recipe": req.recipe,
        "workdir": str(Path.cwd()),
        "fixed": fixed,
        "axes": {a.key: list(a.values) for a in axes},
        "tasks": [{**t, "name": Path(t["run_dir"]).name} for t in tasks],
        "jobs": [*before, job],
    }
    (sweep_dir / SWEEP_FILE).write_text(json.dumps(sweep, indent=2) + "\n")


def progress(run_dir: Path) -> tuple[int | None, str, float | None]:
    """The last step logged, and the monitored metric's name and last value."""
    rows = read_jsonl(run_dir / METRICS_FILE)
    recipe = _recipe(run_dir)
    metric, _ = monitor(recipe)
    step = max((r["step"] for r in rows if isinstance(r.get("step"), int)), default=None)
    values = [r[metric] for r in rows if isinstance(r.get(metric), (int, float))]
    return step, metric, values[-1] if values else None


def _recipe(run_dir: Path) -> dict[str, Any]:
    import yaml

    try:
        found = yaml.safe_load((run_dir / RECIPE_FILE).read_text())
    except (OSError, yaml.YAMLError):
        return {}
    return found if isinstance(found, dict) else {}


def queued_tasks(jobs: list[str]) -> dict[str, dict[str, str | None]]:
    """How each task of these array jobs stands in the queue, by `<array job>_<index>`: one squeue call per array job,
    not per task (a loop of squeue calls loads the controller, which cluster admins ask users not to do; one call for
    all would fail all for one job SLURM no longer knows)."""
    found: dict[str, dict[str, str | None]] = {}
    if not shutil.which("squeue"):
        return found
    for job in jobs:
        # --states=all: ended tasks too, while SLURM keeps them; -r: pending tasks a line each, not folded (41_[2-5]).
        cmd = ["squeue", "-h", "--states=all", "-r", "-j", job, "-o", "%i|%T|%r|%S"]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=20, check=False)
        except (OSError, subprocess.TimeoutExpired):
            continue
        for line in proc.stdout.splitlines() if proc.returncode == 0 else []:
            fields = line.strip().split("|")
            if len(fields) == 4:
                found[fields[0]] = slurm.queue_entry(*fields[1:])
    return found


def status_lines(sweep_dir: Path) -> list[str]:
    """`launcher slurm status SWEEP_DIR`: a line per task, from what `slurm status RUN_DIR` finds of its run."""
    sweep = read_sweep(sweep_dir)
    jobs = ", ".join(f"{j['job']} ({j['array']})" for j in sweep.get("jobs", []))
    lines = [f"sweep {sweep_dir}: {len(sweep['tasks'])} task(s); job array(s) {jobs or 'none'}"]
    queue = queued_tasks([str(j["job"]) for j in sweep.get("jobs", [])])
    for t in sweep["tasks"]:
        run_dir, combo = Path(t["run_dir"]), " ".join(as_overrides(t["overrides"]))
        if not (run_dir / "slurm" / SLURM_ATTEMPTS_FILE).is_file():
            lines.append(f"task {t['index']} ({combo}): not submitted")
            continue
        info = slurm.status(run_dir, queue)
        step, metric, value = progress(run_dir)
        last = info["last_run"] or {}
        total = f"/{last['total_steps']}" if last.get("total_steps") else ""
        end = f", {last['stop_reason']}" if last.get("stop_reason") else ""
        reason = f", reason {info['reason']}" if info["reason"] else ""
        lines.append(
            f"task {t['index']} ({combo}): job {info['job']} ({info['state']}{reason}): {info['attempts']} attempt(s), "
            f"{info['requeues']} requeue(s); step {step if step is not None else '-'}{total}{end}; "
            f"{metric} {'-' if value is None else f'{value:.4g}'}"
        )
    return lines

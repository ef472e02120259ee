"""Argument parsing only: each verb calls one function."""

from __future__ import annotations

import argparse
import dataclasses
import os
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

from launcher import ckpt_commands, processes
from launcher.ckpt_commands import quiet_deepspeed
from launcher.errors import RecipeError, RunFailed, say

EXIT_BAD_INPUT = 2
AGENT_LOG_LEVEL = "TORCH_CPP_LOG_LEVEL"


def main(argv: Sequence[str] | None = None) -> int:
    parser = make_parser()
    # Overrides may come before or after options (`train r.yaml --print-recipe a.b=1`); argparse alone would stop
    # collecting them at the first option.
    args, extra = parser.parse_known_args(argv)
    if extra and hasattr(args, "overrides") and not any(e.startswith("-") for e in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return run_verb(args)
    except RecipeError as e:
        return _ended([f"error: {line}" for line in e.problems], EXIT_BAD_INPUT)
    except RunFailed as e:
        return _ended([e.message] if e.message else [], e.exit_code)
    except KeyboardInterrupt:
        return 130
    except Exception as e:
        if processes.under_agent():  # the traceback is printed as usual; the agent learns it need not say more
            processes.report_failure([], 1, said=f"{type(e).__name__}: {e}".splitlines()[0])
        raise


def _ended(lines: list[str], exit_code: int) -> int:
    """Say why the command failed; under `launcher train --processes`, tell the agent instead, which says the
    first failure of all its processes once."""
    if processes.under_agent():
        processes.report_failure(lines, exit_code)
    else:
        for line in lines:
            say(line)
    return exit_code


def run_verb(args: argparse.Namespace) -> int:
    verb = " ".join(v for v in (args.verb, getattr(args, "slurm_verb", None), getattr(args, "ckpt_verb", None)) if v)
    commands = {
        "train": lambda: train_command(args.recipe, args.overrides, args.print_recipe, _launch(args)),
        "validate": lambda: validate_command(args.recipe, args.overrides),
        "plan": lambda: plan_command(args.recipe, args.overrides, args.processes),
        "slurm submit": lambda: slurm_submit_command(args),
        "slurm sweep": lambda: slurm_sweep_command(args),
        "slurm status": lambda: slurm_status_command(args.run_dir),
        "report": lambda: report_command(args.run_dirs, args.out, args.json),
        "tokenize": lambda: tokenize_command(args.text, args.out, args.val_fraction),
        "ckpt info": lambda: ckpt_commands.ckpt_info_command(args.path),
        "ckpt export": lambda: ckpt_commands.ckpt_export_command(
            args.path, args.out, args.force, args.format, args.max_shard_size, args.merge
        ),
    }
    return commands[verb]()


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="launcher", description="Train PyTorch models from YAML recipes.")
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    train = verbs.add_parser("train", help="train a recipe; --processes N starts N processes")
    _recipe_args(train)
    train.add_argument("--print-recipe", action="store_true", help="print the resolved recipe and exit")
    _start_args(train)

    validate = verbs.add_parser("validate", help="check a recipe without training")
    _recipe_args(validate)

    plan = verbs.add_parser("plan", help="what a recipe will do: batches, steps, epochs, the learning-rate curve")
    _recipe_args(plan)
    plan.add_argument("--processes", type=int, default=None, help="processes to plan for (default: WORLD_SIZE or 1)")

    ckpt = verbs.add_parser("ckpt", help="look into checkpoints, export their weights")
    ckpt_verbs = ckpt.add_subparsers(dest="ckpt_verb", required=True, metavar="VERB")
    info = ckpt_verbs.add_parser("info", help="step, metric, world size, size and completeness of checkpoints")
    info.add_argument("path", help="a checkpoint, <checkpoints>/latest or /best, a checkpoints folder or a run dir")
    export = ckpt_verbs.add_parser("export", help="the weights as one safetensors file, or a Hugging Face model")
    export.add_argument("path", help="a checkpoint, or <checkpoints>/latest or /best")
    export.add_argument("--out", required=True, help="the .safetensors file (or, with --format hf, folder) to write")
    export.add_argument("--force", action="store_true", help="replace --out if it exists")
    hf_help = "hf: config, safetensors shards with their index, generation config, tokenizer (from_pretrained)"
    export.add_argument("--format", choices=("safetensors", "hf"), default="safetensors", help=hf_help)
    export.add_argument("--max-shard-size", default="5GB", help="with --format hf: the largest shard (e.g. 2GB)")
    export.add_argument(
        "--merge", action="store_true", help="with --format hf, of a LoRA model: the model with its adapters merged in"
    )

    slurm = verbs.add_parser("slurm", help="run a recipe as a SLURM job; how a job is doing")
    slurm_verbs = slurm.add_subparsers(dest="slurm_verb", required=True, metavar="VERB")
    _job_args(slurm_verbs.add_parser("submit", help="render the job script from the recipe and sbatch it"))
    sweep = slurm_verbs.add_parser("sweep", help="a job array, one task per combination of values (key=a,b)")
    _job_args(sweep)
    sweep.add_argument("--max-parallel", type=int, help="tasks running at a time (default: as many as SLURM allows)")
    sweep.add_argument("--sweep-dir", help="the run dirs' folder (default: the recipe's run dir + -sweep)")
    sweep.add_argument("--resume", action="store_true", help="submit the sweep's unfinished tasks again")
    slurm_status = slurm_verbs.add_parser("status", help="the job, its requeues and the last checkpoint of a run")
    slurm_status.add_argument("run_dir", help="a run dir, or a sweep dir (a line per task)")

    report = verbs.add_parser("report", help="what runs did and what is wrong with them; plots with --out")
    report.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run dirs (several: compared)")
    report.add_argument("--out", help="folder to write PNG plots into (several runs are overlaid)")
    report.add_argument("--json", action="store_true", help="the figures and findings as JSON instead of text")

    tokenize = verbs.add_parser("tokenize", help="a text file as byte-level token files for token_memmap")
    tokenize.add_argument("text", help="a UTF-8 (or any) text file")
    tokenize.add_argument("--out", required=True, help="folder to write train.bin and val.bin into")
    tokenize.add_argument("--val-fraction", type=float, default=0.1, help="the end of the file kept for val")

    return parser


def _job_args(parser: argparse.ArgumentParser) -> None:
    _recipe_args(parser)
    parser.add_argument("--nodes", type=int, default=None, help="nodes (default: the recipe's slurm.nodes, or 1)")
    parser.add_argument("--gpus-per-node", type=int, default=None, help="GPUs per node; 0 runs one CPU process")
    parser.add_argument("--time", default=None, help="wall time, HH:MM:SS or D-HH:MM:SS")
    parser.add_argument("--partition", default=None)
    parser.add_argument("--account", default=None)
    parser.add_argument("--dry-run", action="store_true", help="print the job script instead of submitting it")


def _start_args(train: argparse.ArgumentParser) -> None:
    start = train.add_argument_group("starting the processes (instead of accelerate launch or torchrun)")
    start.add_argument("--processes", type=int, help="processes on this machine (one per GPU; CPU: over gloo)")
    start.add_argument("--nodes", type=int, help="machines, each running this command (default 1)")
    start.add_argument("--node-rank", type=int, help="this machine's rank (default 0); 0 holds the rendezvous")
    start.add_argument("--master-addr", help="the address of the machine of rank 0 (default 127.0.0.1)")
    start.add_argument("--master-port", type=int, help="its port for the rendezvous (default 29500)")
    start.add_argument("--max-restarts", type=int, help="restarts of all processes after a failure (default 0)")


def _recipe_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", help="path to a recipe YAML file")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="overrides such as optimizer.lr=1e-3")


def validate_command(path: str, overrides: Sequence[str]) -> int:
    from launcher.recipe import load_recipe

    recipe = load_recipe(path, overrides)
    print(f"{path}: ok ({recipe.name}, run dir {recipe.run_dir})")
    return 0


def _launch(args: argparse.Namespace) -> processes.Launch | None:
    """The processes `launcher train` starts itself; None where it is one of them (or the only one)."""
    flags = ("nodes", "node_rank", "master_addr", "master_port", "max_restarts")
    given = {f: getattr(args, f) for f in flags if getattr(args, f) is not None}
    if args.processes is None and not given:
        return None
    return processes.Launch(processes=1 if args.processes is None else args.processes, **given)


def train_command(
    path: str, overrides: Sequence[str], print_recipe: bool, launch: processes.Launch | None = None
) -> int:
    quiet = launch is not None and AGENT_LOG_LEVEL not in os.environ
    if launch is not None:
        problems = processes.launch_problems(launch, os.environ)
        if problems:
            raise RecipeError(problems)
        # The agent's rendezvous retries, logged by torch's C++ with stack frames, are not the user's business (a
        # rendezvous that fails is said in one line); set before torch loads, which reads it then. The processes
        # are started without it.
        os.environ.setdefault(AGENT_LOG_LEVEL, "FATAL")
    from launcher.recipe import dump, load_recipe

    # A checkpoint named by `resume` is read (its checksums) once, by the start (loop.preflight), not here as well.
    # A tokenized dataset is built here, into its cache, so that what only its tokens tell is refused before the run.
    recipe = load_recipe(path, overrides, read_resume=False, build_data=not print_recipe)
    if print_recipe:
        print(dump(recipe), end="")
        return 0
    if launch is not None:  # the recipe is good: start the processes, each of which runs this command alone
        from launcher import agent, strategies

        problems = strategies.choose(recipe, launch.processes * launch.nodes).world_problems()
        if problems:
            raise RecipeError([f"{path}: {p}" for p in problems])
        launch = dataclasses.replace(launch, timeout_s=recipe.strategy.timeout_s)

        return agent.start(launch, [path, *overrides], quieted=AGENT_LOG_LEVEL if quiet else None)

    quiet_deepspeed()  # torch and accelerate load only once the recipe is known to be good
    from launcher import loop

    try:
        loop.run(recipe, loop.preflight(recipe, os.environ))
    except RecipeError as e:
        raise RecipeError([f"{path}: {p}" for p in e.problems]) from None
    return 0


def slurm_submit_command(args: argparse.Namespace) -> int:
    from launcher import slurm
    from launcher.recipe import load_recipe

    # Submitted from a login node for other machines: what this one has (a GPU, its memory) does not matter.
    recipe = load_recipe(args.recipe, args.overrides, this_machine=False)
    options = slurm.job_options(recipe.slurm, **_job_flags(args))
    problems = slurm.options_problems(options)
    if problems:
        raise RecipeError(problems)
    run_dir = Path(recipe.run_dir).resolve()
    # The job runs where this command runs; the recipe is passed as given, relative to it, the run dir resolved.
    overrides = [o for o in args.overrides if o.partition("=")[0].strip() != "run_dir"]
    script = slurm.render(
        [args.recipe, *overrides, f"run_dir={run_dir}"],
        str(run_dir),
        options,
        name=recipe.name,
        workdir=shlex.quote(str(Path.cwd())),
        python=slurm.python_executable(),
    )
    if args.dry_run:
        print(script, end="")
        return 0
    sbatch = slurm.find_sbatch()  # before anything is written
    slurm.check_nodes(options)
    (run_dir / "slurm").mkdir(parents=True, exist_ok=True)
    path = run_dir / "slurm" / "job.sbatch"
    path.write_text(script)
    job = slurm.submit(sbatch, path)
    slurm.record_submit(run_dir, job)
    print(f"submitted job {job}: {recipe.name} on {options.nodes} node(s); log {run_dir}/slurm/{job}.out")
    print(f"  launcher slurm status {run_dir}")
    return 0


def _job_flags(args: argparse.Namespace) -> dict[str, object]:
    return {f: getattr(args, f) for f in ("nodes", "gpus_per_node", "time", "partition", "account")}


def slurm_sweep_command(args: argparse.Namespace) -> int:
    from launcher import sweep

    flags = (args.max_parallel, args.sweep_dir, args.resume, args.dry_run)
    return sweep.submit(sweep.Request(args.recipe, tuple(args.overrides), _job_flags(args), *flags))


def slurm_status_command(run_dir: str) -> int:
    from launcher import slurm, sweep

    path = Path(run_dir)
    print("\n".join(sweep.status_lines(path)) if sweep.is_sweep(path) else slurm.describe(slurm.status(path)))
    return 0


def report_command(run_dirs: Sequence[str], out_text: str | None, as_json: bool) -> int:
    import json

    from launcher import plots, sweep_report

    out = Path(out_text) if out_text else None
    if out is not None and not plots.available():
        raise RecipeError(f"--out: {plots.INSTALL_HINT}")
    if out is not None and out.exists() and not out.is_dir():
        raise RecipeError(f"--out: {out} exists and is not a folder")
    runs, text, records, metrics = sweep_report.report([Path(p) for p in run_dirs])  # a sweep dir: its table
    try:
        print(json.dumps(records, indent=2) if as_json else text, flush=True)
    except BrokenPipeError:  # `launcher report ... | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    if out is not None:
        written = plots.plot(runs, out, metrics)
        say(f"plots: {', '.join(str(p) for p in written) or 'none (nothing logged to draw)'}")
    return 0


def tokenize_command(text: str, out_text: str, val_fraction: float) -> int:
    from launcher.data.memmap import write_bytes

    source, out = Path(text), Path(out_text)
    if not source.is_file():
        raise RecipeError(f"{text}: no such file")
    if not 0 < val_fraction < 1:
        raise RecipeError(f"--val-fraction: expected a number between 0 and 1, got {val_fraction}")
    if out.exists() and not out.is_dir():
        raise RecipeError(f"--out: {out} exists and is not a folder")
    counts = write_bytes(source, out, val_fraction)
    print(
        f"{out}/train.bin: {counts['train']:,} tokens, {out}/val.bin: {counts['val']:,} tokens (uint16, vocab 256); "
        f"use data.dataset.path={out}/{{split}}.bin data.dataset.vocab_size=256"
    )
    return 0


def plan_command(path: str, overrides: Sequence[str], processes: int | None) -> int:
    from launcher import planning

    print(planning.describe(path, overrides, processes))
    return 0

"""python -m bench: every figure in docs/benchmarks.md, in one run.

    python -m bench                                  everything; prints the Markdown
    python -m bench --out docs/benchmarks.md         ... and puts it into that file, between its bench markers
    python -m bench --parts loops --workloads a --processes 1 --quick    a part, a smoke run

Parts: `loops` (the launcher against hand-written PyTorch, Accelerate and Lightning loops: workloads (a) and (b),
1 and 2 processes; see bench/overhead.py) and `checkpoint` (save and load of a 100M-parameter model with AdamW
state against one plain write, and the stall of background saving; see bench/checkpoint_io.py); `speed`
(bench/speed.py), `sampling` (random block offsets and weight decay against the char transformer's val/loss:
bench/sampling.py) and `host` (the host time per update: workload (m), a tiny MLP with AdamW on one thread, against
the PyTorch, Accelerate and Lightning loops) write sections of their own. Run it on an otherwise idle machine:
anything else running skews the ratios.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import re
import statistics
import sys
import tempfile
from importlib import metadata
from pathlib import Path

from bench import overhead  # not torch: the runs' peak memory would start from this process's
from bench.workloads import SHAKESPEARE, workloads

# (workload, processes) -> (steps, repeats): long enough that the steps outweigh the machine's noise
PLAN = {
    ("a", 1): (3000, 7),
    ("b", 1): (300, 5),
    ("h", 1): (150, 5),
    ("a", 2): (2000, 5),
    ("b", 2): (100, 3),
    ("h", 2): (60, 3),
    ("m", 1): (3000, 5),
}
PARTS = ("loops", "checkpoint", "speed", "sampling", "precision", "host")
BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"
# Parts with markers of their own (`<!-- bench:NAME:begin -->`), under these headings: a run of one alone leaves
# the other parts' figures as they are.
OWN_SECTIONS = {
    "speed": "Speed features",
    "sampling": "Sampling and weight decay on Tiny Shakespeare",
    "precision": "bf16 with a big vocabulary: the logits and the loss",
    "host": "Host time per update",
}


def markers(part: str) -> tuple[str, str]:
    return f"<!-- bench:{part}:begin -->", f"<!-- bench:{part}:end -->"


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    with open("/proc/cpuinfo") as f:  # Linux: the model name is there
        names = re.findall(r"model name\s*:\s*(.+)", f.read())
    cpu = names[0] if names else cpu
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    installed = [name for name in ("torch", "accelerate", "lightning") if importlib.util.find_spec(name)]
    versions = ", ".join(f"{name} {metadata.version(name)}" for name in installed)
    python = platform.python_version()
    return f"{os.cpu_count()} CPU cores ({cpu}), {memory:.0f} GiB, no GPU used; Python {python}, {versions}"


def loops(args: argparse.Namespace) -> tuple[str, dict[str, float]]:
    sections, headline, raw = [], {}, {}
    variants = [v for v in overhead.available_variants() if v in args.variants]
    if "lightning" in args.variants and "lightning" not in variants:
        sections.append('Lightning is not installed (`pip install -e ".[bench]"`): its rows are left out.')
    for processes in args.processes:
        for key in args.workloads:
            if key in ("b", "h") and not args.text.is_file():
                sections.append(f"Workload ({key}) left out: {args.text} does not exist (give --text FILE).")
                continue
            steps, repeats = (20, 1) if args.quick else PLAN[key, processes]
            repeats = args.repeats or repeats
            w = workloads(args.text)[key]
            print(f"measuring workload ({key}), {processes} process(es), {steps} steps x {repeats}", file=sys.stderr)
            figures = overhead.measure(w, processes, steps, repeats, args.text, variants, args.precision)
            sections.append(overhead.table(w, processes, steps, repeats, figures))
            if args.precision != "fp32":
                sections[-1] = sections[-1].replace(": ", f" in {args.precision} (autocast on the CPU): ", 1)
            print(sections[-1], file=sys.stderr, flush=True)  # as it comes: a long run shows its progress
            raw[f"{key}/{processes}"] = figures
            for variant, ratio in overhead.ratios(figures).items():
                headline[f"({key}) {processes}p {variant}"] = ratio
    if args.raw:
        overhead.dump(args.raw, raw)
    return "\n\n".join(sections), headline


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    parser.add_argument("--workloads", nargs="+", choices=["a", "b", "h"], default=["a", "b", "h"])
    parser.add_argument("--processes", nargs="+", type=int, choices=[1, 2], default=[1, 2])
    parser.add_argument("--variants", nargs="+", choices=overhead.VARIANTS, default=list(overhead.VARIANTS))
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32", help="loops: bf16 autocast")
    parser.add_argument("--quick", action="store_true", help="20 steps, 1 repeat, 2M parameters: a smoke run")
    parser.add_argument("--profiler-base", default=None, help="speed: the launcher before the profiler (a git ref)")
    parser.add_argument("--repeats", type=int, help="repeats of every run (default: as planned, 3 to 7)")
    parser.add_argument("--text", type=Path, default=SHAKESPEARE, help="the text of workload (b)")
    parser.add_argument("--seeds", nargs="+", type=int, help="sampling: the seeds of every variant (default: 1337)")
    parser.add_argument("--params-millions", type=float, default=100.0)
    parser.add_argument("--out", type=Path, help="a Markdown file to put the results into, between its markers")
    parser.add_argument("--raw", type=Path, help="a JSON file for every run's figures")
    args = parser.parse_args()

    command = "python -m bench " + " ".join(sys.argv[1:])
    measured = f"Measured {datetime.date.today().isoformat()} by `{command.strip()}` on {machine()}."
    parts = [measured]
    headline: dict[str, float] = {}
    if "loops" in args.parts:
        text, headline = loops(args)
        parts += ["### The launcher against hand-written loops", text]
    # Before the checkpoint part, which imports torch into this process (see overhead.measure).
    own = {"host": "\n\n".join([measured, host(args)])} if "host" in args.parts else {}
    if "checkpoint" in args.parts:
        from bench import checkpoint_io  # (imports torch: after the loops)

        print("measuring checkpoints", file=sys.stderr)
        millions = 2.0 if args.quick else args.params_millions
        with tempfile.TemporaryDirectory(prefix="launcher-bench-", dir=os.environ.get("BENCH_DIR")) as tmp:
            text = checkpoint_io.run(millions, 1 if args.quick else args.repeats or 5, Path(tmp))
        parts += ["### Checkpoints", text]
    own |= {
        part: "\n\n".join([measured, own_section(part, args)])
        for part in ("speed", "sampling", "precision")
        if part in args.parts
    }
    report = "\n\n".join(parts) + "\n" if len(parts) > 1 else ""
    print(report + "".join(section + "\n" for section in own.values()))
    if headline:
        print("headline ratios (steps/s against the PyTorch loop):", json.dumps(headline, indent=1), file=sys.stderr)
    if args.out:
        text = args.out.read_text() if args.out.exists() else f"{BEGIN}\n{END}\n"
        if report:
            text = between(text, BEGIN, END, report, args.out)
        for part, section in own.items():
            begin, end = markers(part)
            if begin not in text:  # a new section at the end
                text = text.rstrip("\n") + f"\n\n## {OWN_SECTIONS[part]}\n\n{begin}\n{end}\n"
            text = between(text, begin, end, section + "\n", args.out)
        args.out.write_text(text)


def host(args: argparse.Namespace) -> str:
    """The host-time part: workload (m) on one process, every variant, alternating; the launcher's ratios to the
    PyTorch and Accelerate loops under the table."""
    steps, repeats = (20, 1) if args.quick else PLAN["m", 1]
    repeats = args.repeats or repeats
    variants = [v for v in overhead.available_variants() if v in args.variants]
    w = workloads(args.text)["m"]
    print(f"measuring the host time per update: workload (m), {steps} steps x {repeats}", file=sys.stderr)
    figures = overhead.measure(w, 1, steps, repeats, args.text, variants)
    if args.raw:
        overhead.dump(args.raw if "loops" not in args.parts else args.raw.with_suffix(".host.json"), {"m/1": figures})
    text = overhead.table(w, 1, steps, repeats, figures)
    if "launcher" not in figures:
        return text
    lines = []
    for base in ("torch", "accelerate"):
        if base in figures:
            # The variants alternate within a round: a round's ratio compares runs made moments apart.
            rounds = [a / b for a, b in zip(figures["launcher"].rates, figures[base].rates, strict=True)]
            of_medians = statistics.median(figures["launcher"].rates) / statistics.median(figures[base].rates)
            lines.append(
                f"- against the {overhead.NAMES[base]}: {of_medians:.2f}x (ratio of the medians); within each "
                f"round {', '.join(f'{r:.2f}x' for r in rounds)} (median {statistics.median(rounds):.2f}x)"
            )
    return text + "\n\n`launcher train`:\n" + "\n".join(lines)


def own_section(part: str, args: argparse.Namespace) -> str:
    """The Markdown of a part with a section of its own."""
    if part == "speed":
        from bench import speed

        print("measuring the speed features", file=sys.stderr)
        return speed.measure(args.quick, args.text, args.profiler_base or speed.PROFILER_BASE)
    if part == "precision":
        from bench import precision

        print("measuring bf16 with a big vocabulary", file=sys.stderr)
        return precision.run(args.quick, args.text, args.repeats)
    from bench import sampling

    print("measuring sampling and weight decay", file=sys.stderr)
    return sampling.measure(args.quick, args.text, tuple(args.seeds) if args.seeds else None)


def between(text: str, begin: str, end: str, report: str, path: Path) -> str:
    """`text` with `report` between its markers `begin` and `end`."""
    if begin not in text or end not in text:
        raise SystemExit(f"error: {path}: no {begin} ... {end} markers to put the results between")
    head, rest = text.split(begin, 1)
    return f"{head}{begin}\n{report}{end}{rest.split(end, 1)[1]}"


if __name__ == "__main__":
    main()

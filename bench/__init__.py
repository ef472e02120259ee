"""Benchmarks of the launcher against hand-written loops, and of its checkpoints against plain writes.

python -m bench            every figure in docs/benchmarks.md (about half an hour on 2 CPU cores)
python -m bench --help     the parts, and how to run one of them
"""

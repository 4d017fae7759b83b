"""Command line: write generated task records as JSONL.

Example::

    python -m dllm.tasks --task addition --split train --num 1000 --seed 0 --out data/train.jsonl
    python -m dllm.tasks --task addition:0.3,chain:0.7 --split test --num 200 --out data/test.jsonl
"""

from __future__ import annotations

import argparse
import sys

from dllm.checks import check_output_file
from dllm.data.records import write_jsonl
from dllm.errors import UserError
from dllm.tasks import SPLIT_BUCKETS, TASKS, generate_examples


def parse_tasks(text: str) -> str | dict[str, float]:
    """Parse ``name`` or a comma-separated mix ``name[:weight],...`` (weights default to 1).

    Args:
        text: The ``--task`` value.

    Returns:
        A single name, or a dict of name to weight.

    Raises:
        ValueError: On an unknown task name or a weight that is not a number.
    """
    parts = [p.strip() for p in text.split(",") if p.strip()]
    weights: dict[str, float] = {}
    for part in parts:
        name, _, weight = part.partition(":")
        if name not in TASKS:
            raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(sorted(TASKS))}")
        try:
            weights[name] = weights.get(name, 0.0) + (float(weight) if weight else 1.0)
        except ValueError:
            raise ValueError(f"bad weight {weight!r} for task {name!r}") from None
    if not weights:
        raise ValueError("no task given")
    return parts[0].partition(":")[0] if len(parts) == 1 else weights


def main(argv: list[str] | None = None) -> int:
    """Run the command line.

    Args:
        argv: Arguments (defaults to ``sys.argv[1:]``).

    Returns:
        The exit status.
    """
    parser = argparse.ArgumentParser(
        prog="python -m dllm.tasks",
        description="Write synthetic reasoning task records as JSONL. Known tasks: " + ", ".join(sorted(TASKS)),
    )
    parser.add_argument("--task", required=True, help="task name, or a mix like 'addition:0.3,chain:0.7'")
    parser.add_argument("--split", required=True, choices=list(SPLIT_BUCKETS))
    parser.add_argument("--num", type=int, required=True, help="number of records")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="-", help="output .jsonl path ('-' for stdout)")
    args = parser.parse_args(argv)
    if args.out != "-":
        try:
            check_output_file(args.out, "--out", "train.jsonl")  # before generating anything
        except UserError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2

    try:
        tasks = parse_tasks(args.task)
        records = generate_examples(tasks, args.split, args.num, args.seed)
    except ValueError as err:
        parser.error(str(err))

    write_jsonl(records, args.out, f"{len(records)} records")
    return 0


if __name__ == "__main__":
    sys.exit(main())

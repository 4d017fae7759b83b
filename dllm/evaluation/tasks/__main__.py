"""``python -m dllm.evaluation.tasks [--out DIR]``: write the offline tasks' JSONL (deterministic)."""

from __future__ import annotations

import argparse

from dllm.evaluation.tasks import DATA_DIR, write_data

if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m dllm.evaluation.tasks", description=__doc__)
    parser.add_argument("--out", default=str(DATA_DIR), help="folder for <task>.jsonl (default: the package's)")
    write_data(parser.parse_args().out)

"""``bench/generation.py --processes K``: run the same command in K fresh processes and report the spread.

Each run writes its own JSON beside ``--out``; :func:`spread` collects min / median / max of each
configuration's forwards and speed ratio to HF into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def spread(argv: list[str], args: argparse.Namespace, script: Path) -> dict:
    """Run the same command in ``args.processes`` fresh processes and report each configuration's spread.

    Forwards depend on the step times the adaptive policy measured (so on the
    machine's load), speed ratios on the load during each run: one process
    says little on a shared machine. Each run writes its own JSON beside
    ``--out`` (``.run<i>.json``); the spread goes to ``--out``. ``script`` is ``bench/generation.py``.
    """
    import statistics
    import subprocess

    base = [a for i, a in enumerate(argv) if a != "--processes" and (i == 0 or argv[i - 1] != "--processes")]
    base = [a for a in base if not a.startswith("--processes=")]
    runs = []
    for i in range(args.processes):
        out = args.out.with_suffix(f".run{i}.json")
        rest = [a for j, a in enumerate(base) if a != "--out" and (j == 0 or base[j - 1] != "--out")]
        subprocess.run([sys.executable, str(script), *rest, "--out", str(out)], check=True)
        runs.append(json.loads(out.read_text()))
    rows = []
    for section in ("methods", "sampling", "real", "chat", "grounded"):
        keys = [(r["batch"], r["label"]) for r in runs[0].get(section, [])]
        for batch, label in keys:
            found = [r for run in runs for r in run.get(section, []) if (r["batch"], r["label"]) == (batch, label)]
            row = {"section": section, "batch": batch, "label": label, "runs": len(found)}
            for key in ("forwards", "ratio_to_hf"):
                values = [r[key] for r in found if r.get(key) is not None]
                if values:
                    row[key] = [min(values), statistics.median(values), max(values)]
            rows.append(row)
    lines = [
        "| section | batch | method | forwards min / median / max | x HF min / median / max | runs |",
        "|---|---:|---|---|---|---:|",
    ]
    for row in rows:
        fw, x = row.get("forwards"), row.get("ratio_to_hf")
        fw = f"{fw[0]} / {fw[1]:g} / {fw[2]}" if fw else "-"
        x = f"{x[0]:.2f} / {x[1]:.2f} / {x[2]:.2f}" if x else "-"
        lines.append(f"| {row['section']} | {row['batch']} | {row['label']} | {fw} | {x} | {row['runs']} |")
    print(f"\n## Spread over {args.processes} fresh processes\n\n" + "\n".join(lines))
    report = {"spread": rows, "processes": args.processes, "runs": [str(args.out.with_suffix(f".run{i}.json"))
                                                                    for i in range(args.processes)]}  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {args.out}")
    return report

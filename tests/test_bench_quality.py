"""Smoke the quality report (``bench/quality.py --quick``): tables, JSON, plots, the two-stage curve, reuse."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_quick(out: Path) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "bench/quality.py", "--quick", "--threads", "1", "--out-dir", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-4000:]
    return proc


def test_bench_quality_quick(tmp_path: Path) -> None:
    out = tmp_path / "quality"
    run_quick(out)
    for name in ("quality.md", "quality.json", "accuracy_vs_tpf.png", "learning_curve.png", "finetune_curve.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG" or name.endswith((".md", ".json")), name
        assert (out / name).stat().st_size > 0, name

    report = json.loads((out / "quality.json").read_text())
    assert list(report["results"]) == ["sft", "sft-recipe", "refine"]
    for rows in report["results"].values():
        labels = [r["method"] for r in rows]
        assert labels[:4] == ["AR (HF generate)", "refine N=3 R=1", "refine N=3 R=2", "jacobi N=3"]
        for row in rows:
            assert 0.0 <= row["accuracy"] <= 1.0 and row["tpf"] >= 1.0 and row["tokens_per_s"] > 0
            if row["mode"] in ("jacobi", "adaptive"):
                assert row["same_as_ar"] == 1.0  # jacobi is lossless whatever the model learned
    # Stage 2 starts from the SFT model: its curve begins at step 0 and ends at the last step.
    steps = [point[0] for point in report["curves"]["sft-recipe"]]
    assert steps[0] == 0 and steps[-1] == report["setup"]["stage2_steps"]
    assert report["timing"]["sft-recipe"]["train_s"] > 0
    table = (out / "quality.md").read_text()
    assert "## Refine fine-tuning of the SFT model" in table and "## From scratch" in table
    # one summary row, one per method, one per point of the stage-2 learning curve
    rows = 1 + len(report["results"]["sft-recipe"]) + len(report["curves"]["sft-recipe"])
    assert table.count("| sft-recipe |") == rows

    # A second run reuses every checkpoint instead of training again.
    stdout = run_quick(out).stdout
    assert stdout.count("reusing") == 3 and "] training" not in stdout

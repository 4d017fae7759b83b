"""Smoke the quality report (``bench/quality.py --quick``): table, JSON and both plots, then checkpoint reuse."""

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
    for name in ("quality.md", "quality.json", "accuracy_vs_tpf.png", "learning_curve.png"):
        assert (out / name).stat().st_size > 0, name
    assert (out / "accuracy_vs_tpf.png").read_bytes()[:4] == b"\x89PNG"

    report = json.loads((out / "quality.json").read_text())
    assert set(report["results"]) == {"sft", "refine"}
    for rows in report["results"].values():
        assert [r["method"] for r in rows] == ["AR (HF generate)", "refine N=3 R=1", "refine N=3 R=2", "jacobi N=3"]
        for row in rows:
            assert 0.0 <= row["accuracy"] <= 1.0 and row["tpf"] >= 1.0 and row["tokens_per_s"] > 0
        assert rows[-1]["same_as_ar"] == 1.0  # jacobi is lossless whatever the model learned
    table = (out / "quality.md").read_text()
    assert table.count("| sft |") == 4 and table.count("| refine |") == 4

    # A second run reuses the checkpoints instead of training again.
    assert "reusing" in run_quick(out).stdout

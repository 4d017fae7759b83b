"""Smoke the generation speed benchmark (``bench/generation.py --quick``) end to end."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_bench_generation_quick(tmp_path: Path) -> None:
    out = tmp_path / "g.json"
    proc = subprocess.run(
        [sys.executable, "bench/generation.py", "--quick", "--out", str(out), "--real-model", str(tmp_path / "none")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    for heading in ("## Methods", "## Cache scaling", "## Sampling", "## Real model: skipped"):
        assert heading in proc.stdout, heading

    report = json.loads(out.read_text())
    env = report["environment"]
    for key in ("device", "dtype", "torch", "transformers", "threads"):
        assert env[key], key

    rows = report["methods"]
    assert {r["label"] for r in rows} >= {"hf", "refine N=3 R=2", "jacobi N=3", "jacobi N=3 adaptive"}
    assert {r["batch"] for r in rows} == {1, 8}
    for row in rows:
        assert row["tokens_per_s"] > 0 and row["forwards"] > 0, row
        assert row["full_budget"], row  # the stop id is never generated
        if row["method"] == "hf":
            assert row["tokens_per_forward"] == 1.0 and row["ratio_to_hf"] == 1.0
        if row["label"] == "refine N=3 R=1":
            assert row["tokens_per_forward"] == 4.0  # a block of N + 1 = 4 tokens per forward
            assert row["target_ratio"] == 0.8 * 4

    sampled = [r for r in report["sampling"] if r["sampled"]]
    assert {r["label"] for r in sampled} == {"hf", "jacobi N=0 adaptive", "jacobi N=7 adaptive", "refine N=7 R=2"}
    assert all(r["time_vs_greedy"] > 0 for r in sampled)
    assert "152064" in env["sampling_model"]

    cache = report["cache_scaling"]
    assert [c["new_tokens"] for c in cache] == [32, 64]
    assert all(c["speedup"] > 0 for c in cache)
    assert "real" not in report

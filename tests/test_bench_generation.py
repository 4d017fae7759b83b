"""Smoke the generation speed benchmark (``bench/generation.py --quick``) end to end."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_bench_generation_quick(tmp_path: Path) -> None:
    out = tmp_path / "g.json"
    proc = subprocess.run(
        [sys.executable, "bench/generation.py", "--quick", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "| batch | method |" in proc.stdout and "speedup cached/uncached" in proc.stdout

    report = json.loads(out.read_text())
    env = report["environment"]
    for key in ("device", "dtype", "torch", "transformers", "threads"):
        assert env[key], key

    rows = report["methods"]
    assert {r["method"] for r in rows} == {"hf", "refine", "jacobi"}
    assert {r["batch"] for r in rows} == {1, 8}
    for row in rows:
        assert row["tokens_per_s"] > 0, row
        assert row["forwards"] > 0, row
        assert row["full_budget"], row  # the stop id is never generated
    for row in rows:
        if row["method"] == "hf":
            assert row["tokens_per_forward"] == 1.0 and row["ratio_to_hf"] == 1.0
        if row["method"] == "refine" and row["n"] == 3:
            assert row["tokens_per_forward"] >= 1
            assert row["target_ratio"] == 0.8 * 4 / row["r"]
            if row["r"] == 1:
                assert row["tokens_per_forward"] == 4.0  # a block of N + 1 = 4 tokens per forward

    cache = report["cache_scaling"]
    assert [c["new_tokens"] for c in cache] == [32, 64]
    for entry in cache:
        assert entry["cached"]["tokens_per_s"] > 0 and entry["uncached"]["tokens_per_s"] > 0
        assert entry["speedup"] > 0

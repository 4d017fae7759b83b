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


def test_grounded_section_configs_and_plot(tmp_path: Path) -> None:
    """The input-grounded section (it needs the real model, so only its configs and its plot run here)."""
    sys.path.insert(0, str(ROOT / "bench"))
    import generation as bench

    configs = bench.grounded_configs([1, 8], 64)
    labels = {(c.batch, c.label) for c in configs}
    assert (1, "hf prompt lookup 10") in labels and (8, "hf prompt lookup 10") not in labels  # HF: batch 1 only
    for batch in (1, 8):
        for sources in bench.GROUNDED_SOURCES:
            assert (batch, f"jacobi N=15 adaptive sources={sources}") in labels
    assert len(bench.GROUNDED_PROMPTS) >= 12
    rows = [
        {"batch": c.batch, "label": c.label, "method": c.method, "ratio_to_hf": 1.0 + i / 10, "matches_hf": True}
        for i, c in enumerate(configs)
    ]
    png = tmp_path / "g.png"
    bench.plot_grounded(rows, png)
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_bench_generation_spread_over_fresh_processes(tmp_path: Path) -> None:
    """``--processes 2``: the section runs in two fresh processes; each row reports min <= median <= max."""
    out = tmp_path / "spread.json"
    proc = subprocess.run(
        [sys.executable, "bench/generation.py", "--quick", "--sections", "methods", "--batch-sizes", "1",
         "--processes", "2", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "## Spread over 2 fresh processes" in proc.stdout
    report = json.loads(out.read_text())
    runs = [json.loads(Path(path).read_text()) for path in report["runs"]]
    assert len(runs) == 2 and all("methods" in run for run in runs)
    rows = {row["label"]: row for row in report["spread"]}
    assert {"hf", "jacobi N=3 adaptive"} <= set(rows)
    for row in rows.values():
        low, mid, high = row["forwards"]
        assert row["runs"] == 2 and low <= mid <= high
        values = sorted(r["forwards"] for run in runs for r in run["methods"] if r["label"] == row["label"])
        assert [low, high] == [values[0], values[-1]]
    assert rows["hf"]["ratio_to_hf"] == [1.0, 1.0, 1.0]


def test_chat_section_runs_every_prompt_on_a_saved_model(tmp_path: Path) -> None:
    """``--sections chat`` on a tiny Llama saved with the byte tokenizer: all eight prompts at batch 1 and 8, HF
    and adaptive jacobi N=15 with the default sources and with ``none``, every output equal to HF greedy's."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from dllm.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    out = tmp_path / "chat.json"
    proc = subprocess.run(
        [sys.executable, "bench/generation.py", "--sections", "chat", "--batch-sizes", "1", "8", "--threads", "1",
         "--real-new-tokens", "12", "--real-model", str(tmp_path / "model"), "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "## Chat:" in proc.stdout and "8 prompts" in proc.stdout
    rows = json.loads(out.read_text())["chat"]
    labels = {(r["batch"], r["label"]) for r in rows}
    for batch in (1, 8):
        assert {(batch, "hf"), (batch, "jacobi N=15 adaptive sources=all")} <= labels
        assert (batch, "jacobi N=15 adaptive sources=none") in labels
    hf_forwards = {r["batch"]: r["forwards"] for r in rows if r["label"] == "hf"}
    assert hf_forwards[1] > 12  # batch 1 ran every prompt, not only the first
    assert all(r["matches_hf"] for r in rows if r["method"] == "jacobi"), rows

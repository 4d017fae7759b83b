"""DDP on CPU (2 processes, gloo): reduced losses, one set of checkpoints, resume, one merged prediction file."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODEL = json.dumps({
    "model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256,
})  # fmt: skip
DDP = ["--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp",
       "--trainer.enable_progress_bar", "false"]  # fmt: skip


def run(script: str, args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'tests'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "OMP_NUM_THREADS": "1"}  # fmt: skip
    result = subprocess.run([sys.executable, str(ROOT / script), *args], cwd=cwd, env=env, capture_output=True,
                            text=True, timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result


def fit(cwd: Path, name: str, max_steps: int, *extra: str) -> dict[int, dict]:
    callbacks = [
        {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
         "init_args": {"dirpath": str(cwd / name / "ckpt"), "save_last": True, "save_top_k": -1,
                       "every_n_train_steps": 3}},
        {"class_path": "ddp_helpers.RankLossDump", "init_args": {"dirpath": str(cwd / name / "losses")}},
    ]  # fmt: skip
    run("train.py", [
        "fit", "--config", str(ROOT / "configs/tiny.yaml"), *DDP, "--trainer.default_root_dir", str(cwd / name),
        "--trainer.logger", "false", "--trainer.callbacks", json.dumps(callbacks), "--trainer.max_steps",
        str(max_steps), "--trainer.limit_val_batches", "0", "--model.model_config", MODEL,
        "--model.warmup_steps", "0", "--model.min_lr_ratio", "1.0",  # constant LR: max_steps does not matter
        "--data.num_train", "64", "--data.batch_size", "4", *extra,
    ], cwd)  # fmt: skip
    per_rank = {}
    for rank in (0, 1):
        lines = (cwd / name / "losses" / f"rank{rank}.jsonl").read_text().splitlines()
        per_rank[rank] = {r["step"]: r for r in map(json.loads, lines)}
    return per_rank


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("ddp")
    return cwd, fit(cwd, "full", 6)


def test_ddp_fit_reduces_losses_across_ranks_and_splits_the_data(uninterrupted):
    cwd, ranks = uninterrupted
    assert sorted(ranks[0]) == sorted(ranks[1]) == list(range(1, 7))
    for step in range(1, 7):
        a, b = ranks[0][step], ranks[1][step]
        assert a["local"] != b["local"]  # each rank saw its own batch ...
        assert not set(a["ids"]) & set(b["ids"])
        assert a["logged"] == pytest.approx((a["local"] + b["local"]) / 2, rel=1e-5)  # ... and logs the mean
        assert b["logged"] == pytest.approx(a["logged"], rel=1e-6)


def test_ddp_writes_each_checkpoint_once(uninterrupted):
    cwd, _ = uninterrupted
    names = sorted(p.name for p in (cwd / "full" / "ckpt").iterdir())
    assert names == ["epoch=0-step=3.ckpt", "epoch=0-step=6.ckpt", "last.ckpt"]


def test_ddp_resume_gives_the_same_losses(uninterrupted, tmp_path):
    _, full = uninterrupted
    first = fit(tmp_path, "part", 3)
    resumed = fit(tmp_path, "part", 6, "--ckpt_path", str(tmp_path / "part" / "ckpt" / "last.ckpt"))
    for rank in (0, 1):
        for step in range(1, 7):
            got = (first if step <= 3 else resumed)[rank][step]
            assert got["ids"] == full[rank][step]["ids"]
            assert got["local"] == pytest.approx(full[rank][step]["local"], rel=1e-5)


def test_ddp_predict_writes_every_prompt_once_in_input_order(uninterrupted, tmp_path):
    cwd, _ = uninterrupted
    prompts = tmp_path / "prompts.jsonl"
    ids = [f"q{i}" for i in range(7)]
    prompts.write_text("".join(json.dumps({"id": i, "prompt": f"{n}+{n}="}) + "\n" for n, i in enumerate(ids)))
    output = tmp_path / "out.jsonl"
    run("predict.py", [
        "--config", str(ROOT / "configs/predict-tiny.yaml"), *DDP, "--ckpt_path",
        str(cwd / "full" / "ckpt" / "last.ckpt"), "--data.prompts_file", str(prompts), "--data.val_batch_size", "2",
        "--predictions.output", str(output), "--predictions.echo", "false", "--model.generation.max_new_tokens", "8",
    ], tmp_path)  # fmt: skip
    records = [json.loads(line) for line in output.read_text().splitlines()]
    assert [r["id"] for r in records] == ids
    assert not list(tmp_path.glob("out.jsonl.rank*"))


def test_ddp_epochs_see_the_data_in_a_new_order(tmp_path):
    """Each epoch reshuffles (the sampler's epoch reaches every rank), and together the ranks cover the data."""
    steps_per_epoch = 64 // (4 * 2)  # 64 examples, batch 4, 2 ranks
    ranks = fit(tmp_path, "epochs", 2 * steps_per_epoch)
    for rank in (0, 1):
        first = [ranks[rank][s]["ids"] for s in range(1, steps_per_epoch + 1)]
        second = [ranks[rank][s]["ids"] for s in range(steps_per_epoch + 1, 2 * steps_per_epoch + 1)]
        assert first != second, f"rank {rank} repeats epoch 0's order"
    for epoch in (0, 1):
        steps = range(epoch * steps_per_epoch + 1, (epoch + 1) * steps_per_epoch + 1)
        seen = [i for rank in (0, 1) for s in steps for i in ranks[rank][s]["ids"]]
        assert len(seen) == len(set(seen)) == 64  # every example once per epoch, no overlap between ranks

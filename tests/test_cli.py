"""The command line as a user meets it: run folders, reruns, safe predict resume, scores, short errors."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import SMALL_MODEL as SMALL_MODEL_CONFIG

from dllm.cli import DLLMCLI, one_line
from dllm.data.predictions import model_fingerprint, score
from dllm.errors import UserError
from dllm.tasks import generate_examples

ROOT = Path(__file__).resolve().parents[1]
SMALL_MODEL = json.dumps(SMALL_MODEL_CONFIG)
SMALL = ["--model.model_config", SMALL_MODEL, "--data.num_train", "32", "--data.num_val", "4", "--data.batch_size", "8",
         "--trainer.enable_progress_bar", "false", "--trainer.log_every_n_steps", "1"]  # fmt: skip


@pytest.fixture(autouse=True)
def in_tmp_dir(tmp_path, monkeypatch):
    """The shipped configs' relative paths (runs/tiny/...) land in the test's folder."""
    monkeypatch.chdir(tmp_path)


def fit(root: Path, steps: int, *extra: str) -> DLLMCLI:
    """The shipped tiny config, shortened; every path comes from ``--trainer.default_root_dir``."""
    return DLLMCLI(
        args=["fit", "--config", str(ROOT / "configs/tiny.yaml"), *SMALL, "--trainer.default_root_dir", str(root),
              "--trainer.max_steps", str(steps), "--trainer.val_check_interval", str(steps), *extra],
    )  # fmt: skip


def step_of(checkpoint: Path) -> int:
    return torch.load(checkpoint, map_location="cpu", weights_only=False)["global_step"]


def predict(root: Path, checkpoint: Path, prompts: Path, *extra: str) -> list[dict]:
    """``predict.py``'s arguments in-process; returns ``<root>/predictions.jsonl``."""
    DLLMCLI(
        args=["predict", "--config", str(ROOT / "configs/predict-tiny.yaml"), "--ckpt_path", str(checkpoint),
              "--trainer.default_root_dir", str(root), "--trainer.enable_progress_bar", "false",
              "--data.prompts_file", str(prompts), "--predictions.echo", "false", "--data.val_batch_size", "2",
              "--model.generation.max_new_tokens", "6", *extra],
        save_config_callback=None,
    )  # fmt: skip
    return read(root / "predictions.jsonl")


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def write_prompts(path: Path, prompts: dict[str, str]) -> Path:
    path.write_text("".join(json.dumps({"id": i, "prompt": p}) + "\n" for i, p in prompts.items()))
    return path


PROMPTS = {"a": "1+2=", "b": "30+4=", "c": "5+67="}


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """Fit twice in one folder (2 steps, then 3); the first run's checkpoint is kept aside."""
    root = tmp_path_factory.mktemp("run") / "r"
    fit(root, 2)
    first = root.parent / "first.ckpt"
    (root / "checkpoints" / "last.ckpt").rename(first)
    (root / "checkpoints" / "last.ckpt").write_bytes(first.read_bytes())  # as the first run left it
    fit(root, 3)
    return root, first


def test_one_flag_moves_the_whole_run(two_runs, tmp_path):
    root, _ = two_runs
    assert (root / "checkpoints" / "last.ckpt").is_file()
    assert (root / "hf" / "config.json").is_file()
    assert (root / "lightning_logs" / "version_1" / "metrics.csv").is_file()
    assert not (tmp_path / "runs").exists()  # nothing went to the config's default folder


def test_a_second_fit_in_the_same_folder_replaces_last_ckpt(two_runs):
    root, _ = two_runs
    assert sorted(p.name for p in (root / "checkpoints").iterdir()) == ["last.ckpt"]  # no last-v1.ckpt
    assert step_of(root / "checkpoints" / "last.ckpt") == 3


def test_resume_and_predict_use_the_newest_run(two_runs, tmp_path):
    root, first = two_runs
    run = tmp_path / "resume"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.ckpt").write_bytes((root / "checkpoints" / "last.ckpt").read_bytes())
    cli = fit(run, 4, "--ckpt_path", "last")  # Lightning's "last": the newest last.ckpt of this run folder
    assert cli.trainer.global_step == 4 and step_of(run / "checkpoints" / "last.ckpt") == 4

    prompts = write_prompts(tmp_path / "p.jsonl", PROMPTS)
    records = predict(tmp_path / "out", root / "checkpoints" / "last.ckpt", prompts)
    assert {r["checkpoint"].split("@")[0] for r in records} == {str(root / "checkpoints" / "last.ckpt")}
    newest = model_fingerprint(str(root / "checkpoints" / "last.ckpt"), {})
    assert newest.split("@")[1] != model_fingerprint(str(first), {}).split("@")[1]


# --- predict resume ----------------------------------------------------------------------------------------


@pytest.fixture
def predicted(two_runs, tmp_path):
    """One finished predict run on PROMPTS into ``tmp_path/out``."""
    root, first = two_runs
    checkpoint = root / "checkpoints" / "last.ckpt"
    prompts = write_prompts(tmp_path / "prompts.jsonl", PROMPTS)
    out = tmp_path / "out"
    return out, checkpoint, prompts, predict(out, checkpoint, prompts)


def plant(path: Path, records: list[dict]) -> list[dict]:
    """Mark each record (a forwards count no run reaches), so a rerun shows whether it reused or regenerated it.

    The mark is a generated field: a reused record takes its other fields from this run's input.
    """
    marked = [{**r, "forwards": 1000 + i} for i, r in enumerate(records)]
    path.write_text("".join(json.dumps(r) + "\n" for r in marked))
    return marked


def count_batches(monkeypatch) -> list[int]:
    """Each predicted batch appends its size: a rerun that reuses every record predicts none."""
    from dllm.module import DLLMModule

    batches, real = [], DLLMModule.predict_step

    def predict_step(module, batch, *args, **kwargs):
        batches.append(len(batch["id"]))
        return real(module, batch, *args, **kwargs)

    monkeypatch.setattr(DLLMModule, "predict_step", predict_step)
    return batches


def test_a_rerun_with_nothing_changed_reuses_every_record(predicted, monkeypatch):
    out, checkpoint, prompts, records = predicted
    marked = plant(out / "predictions.jsonl", records)
    batches = count_batches(monkeypatch)
    assert predict(out, checkpoint, prompts) == marked  # regenerated records would have lost the mark
    assert batches == []


def test_other_generation_settings_stop_and_name_the_flag(predicted):
    out, checkpoint, prompts, records = predicted
    with pytest.raises(UserError, match=r"mode: 'refine' -> 'jacobi'.*--predictions.overwrite true"):
        predict(out, checkpoint, prompts, "--model.generation.mode", "jacobi")
    assert read(out / "predictions.jsonl") == records  # nothing deleted
    again = predict(out, checkpoint, prompts, "--model.generation.mode", "jacobi", "--predictions.overwrite", "true")
    assert [r["settings"]["mode"] for r in again] == ["jacobi"] * 3


def test_another_prompt_text_for_the_same_id_stops(predicted, tmp_path):
    out, checkpoint, _, records = predicted
    changed = write_prompts(tmp_path / "changed.jsonl", {**PROMPTS, "b": "8+9="})
    with pytest.raises(UserError, match=r"id 'b' has another prompt text"):
        predict(out, checkpoint, changed)
    assert read(out / "predictions.jsonl") == records


def test_predictions_of_another_checkpoint_are_not_reused(predicted, two_runs):
    out, _, prompts, records = predicted
    _, first = two_runs
    with pytest.raises(UserError, match=r"written by another model"):
        predict(out, first, prompts)
    assert read(out / "predictions.jsonl") == records


def test_new_ids_never_delete_earlier_records(predicted, tmp_path):
    out, checkpoint, _, records = predicted
    other = write_prompts(tmp_path / "other.jsonl", {"x": "2+2=", "y": "3+3="})
    with pytest.raises(UserError, match=r"3 of them have ids that are not among this run's prompts"):
        predict(out, checkpoint, other)
    assert read(out / "predictions.jsonl") == records
    more = write_prompts(tmp_path / "more.jsonl", {**PROMPTS, "d": "4+4="})  # a superset is fine: reuse + predict d
    assert predict(out, checkpoint, more)[:3] == records


def test_a_second_writer_is_refused_and_the_lock_kept(predicted):
    out, checkpoint, prompts, _ = predicted
    lock = out / "predictions.jsonl.lock"
    lock.write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid()}))  # a live writer
    with pytest.raises(UserError, match=r"being written by another predict run"):
        predict(out, checkpoint, prompts)
    assert lock.is_file()


def test_a_stale_lock_of_a_killed_run_is_taken_over(predicted):
    out, checkpoint, prompts, records = predicted
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    lock = out / "predictions.jsonl.lock"
    lock.write_text(json.dumps({"host": socket.gethostname(), "pid": gone.pid}))
    assert predict(out, checkpoint, prompts) == records
    assert not lock.exists()


def test_a_killed_runs_shard_is_reused_and_its_torn_line_predicted_again(predicted):
    out, checkpoint, prompts, records = predicted
    output = out / "predictions.jsonl"
    kept = [{**records[2], "response": "kept c"}, {**records[0], "response": "kept a"}]
    torn = json.dumps(records[1])[:40]
    (out / "predictions.jsonl.rank0").write_text("".join(json.dumps(r) + "\n" for r in kept) + torn)
    output.unlink()
    again = predict(out, checkpoint, prompts)
    assert [r["id"] for r in again] == ["a", "b", "c"]
    assert again[0]["response"] == "kept a" and again[2]["response"] == "kept c"
    assert again[1] == records[1]  # predicted again, same result
    assert not list(out.glob("*.rank*")) and not list(out.glob("*.lock"))


def test_a_run_killed_before_merging_is_merged_by_the_rerun(predicted, monkeypatch):
    out, checkpoint, prompts, records = predicted
    (out / "predictions.jsonl").unlink()
    marked = plant(out / "predictions.jsonl.rank1", records)  # every record in a shard, no output
    batches = count_batches(monkeypatch)
    assert predict(out, checkpoint, prompts) == marked
    assert batches == [] and not list(out.glob("*.rank*"))


def test_predict_scores_every_record_with_a_reference_reused_ones_included(two_runs, tmp_path):
    root, _ = two_runs
    checkpoint = root / "checkpoints" / "last.ckpt"
    tasks = generate_examples("addition-small", "test", 4, seed=0)
    for r in tasks:
        r.pop("_where", None)
    prompts = tmp_path / "test.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in tasks[:2]))
    out = tmp_path / "out"
    predict(out, checkpoint, prompts)
    prompts.write_text("".join(json.dumps(r) + "\n" for r in tasks))
    records = predict(out, checkpoint, prompts)
    assert [r["id"] for r in records] == [str(r["id"]) for r in tasks]
    assert all(r["answer"] == t["answer"] and r["task"] == "addition-small" for r, t in zip(records, tasks))
    metrics = json.loads((out / "predictions.metrics.json").read_text())
    assert metrics["records"] == metrics["scored"] == 4
    assert metrics == score(records)


def test_score_counts_exact_and_contains_matches():
    records = [
        {"response": "42", "reference": "42", "new_tokens": 2, "forwards": 1},
        {"response": "it is 42.", "reference": "42", "new_tokens": 4, "forwards": 2},
        {"response": "7", "reference": "42", "new_tokens": 1, "forwards": 1},
        {"response": "no reference", "new_tokens": 1, "forwards": 1},
        {"response": "1+2\nanswer: 3", "task": "addition", "answer": "3", "reference": "x", "new_tokens": 2,
         "forwards": 2},
    ]  # fmt: skip
    metrics = score(records)
    assert (metrics["records"], metrics["scored"]) == (5, 4)
    assert metrics["exact_match"] == pytest.approx(2 / 4) and metrics["contains_match"] == pytest.approx(3 / 4)
    assert metrics["tokens_per_forward"] == pytest.approx(10 / 7, abs=1e-4)
    assert score([{"response": "a", "new_tokens": 1, "forwards": 1}]) is None


# --- errors ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["missing", "empty", "truncated"])
def test_a_bad_checkpoint_is_named_before_anything_loads(two_runs, tmp_path, kind):
    root, _ = two_runs
    path = tmp_path / f"{kind}.ckpt"
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "truncated":
        path.write_bytes((root / "checkpoints" / "last.ckpt").read_bytes()[:4000])
    expected = "no such file" if kind == "missing" else "not a readable checkpoint"
    with pytest.raises(UserError, match=rf"--ckpt_path {path}: {expected}"):
        predict(tmp_path, path, write_prompts(tmp_path / "p.jsonl", PROMPTS))


def run_script(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / script), *args], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize(
    "script, args, message",
    [
        ("predict.py", ["--config", "configs/predict-tiny.yaml", "--ckpt_path", "runs/nothere/last.ckpt"],
         "error: --ckpt_path runs/nothere/last.ckpt: no such file"),
        ("train.py", ["fit", "--config", "configs/tiny.yaml", "--model.generation.mode", "fast"],
         "error: --model.generation.mode: Expected a typing.Literal['refine', 'jacobi']. Got value: fast"),
        ("train.py", ["fit", "--config", "configs/tiny.yaml", "--data.task", "null", "--data.train_file", "no.jsonl"],
         "error: data.train_file: no such file: no.jsonl"),
        ("predict.py", ["-c", "configs/predict-tiny.yaml", "--model.pretrained", "m", "--model.generation.top_p", "2"],
         "error: model.generation.top_p "),  # the module's own check, raised inside jsonargparse
        ("predict.py", ["--config", "configs/predict-tiny.yaml"], "error: predict needs --ckpt_path"),
    ],
)  # fmt: skip
def test_a_user_mistake_is_one_line_and_exit_code_2(script, args, message, tmp_path):
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    (tmp_path / "examples").symlink_to(ROOT / "examples")
    result = run_script(script, *args)
    assert result.returncode == 2, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(message), result.stderr[-3000:]


def test_debug_keeps_the_traceback(tmp_path):
    result = run_script("predict.py", "--config", str(ROOT / "configs/predict-tiny.yaml"), "--ckpt_path", "no.ckpt",
                        "--debug")  # fmt: skip
    assert result.returncode != 0 and "Traceback" in result.stderr and "UserError" in result.stderr


def test_one_line_condenses_a_nested_argument_report():
    from jsonargparse import ArgumentError

    report = (
        'Parser key "trainer.callbacks":\n  - Does not validate against any of the Union subtypes\n  Errors:\n'
        "    - Problem with given class_path 'foo.Bar':\n        No module named 'foo'\n  Given value: [...]"
    )
    assert one_line(ArgumentError(None, report)) == "--trainer.callbacks (foo.Bar): No module named 'foo'"


def test_print_config_comments_shows_the_help_of_each_key(capsys):
    with pytest.raises(SystemExit):
        DLLMCLI(args=["fit", "--config", str(ROOT / "configs/tiny.yaml"), "--print_config=comments"])
    out = capsys.readouterr().out
    assert "# peak AdamW learning rate" in out and "lr: 0.005" in out


def test_a_redirected_predict_from_an_hf_folder_prints_no_loading_bar(tmp_path):
    """Output in a log file: transformers' "Loading weights" bar (carriage returns) is off; the answer is written."""
    from dllm.module import DLLMModule

    DLLMModule(model_config=json.loads(SMALL_MODEL), tokenizer="byte").save_hf(str(tmp_path / "hf"))
    output = tmp_path / "out.jsonl"
    result = run_script("predict.py", "--config", str(ROOT / "configs/predict-tiny.yaml"), "--model.pretrained",
                        str(tmp_path / "hf"), "--data.prompt", "1+1=", "--predictions.output", str(output),
                        "--model.generation.max_new_tokens", "4")  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Loading weights" not in result.stderr and "\r" not in result.stderr, result.stderr[-3000:]
    assert [json.loads(line)["prompt"] for line in output.read_text().splitlines()] == ["1+1="]


# --- hostile records: line separators, overwrite, what resume matches, locks ---------------------------------


def test_line_separators_in_prompts_and_responses_never_jam_predict(two_runs, tmp_path):
    """Issue: a U+2028 in a record made every rerun fail at merge ("malformed JSON ... rank0:1"), for good."""
    root, _ = two_runs
    checkpoint = root / "checkpoints" / "last.ckpt"
    hostile = {"a": "1\u2028+2=", "b": "3\u2029+4\x85=", "c": "5\x0c+6\x0b=\x1c"}
    prompts = write_prompts(tmp_path / "p.jsonl", hostile)
    out = tmp_path / "out"
    records = predict(out, checkpoint, prompts)
    assert [r["prompt"] for r in records] == list(hostile.values())
    assert len((out / "predictions.jsonl").read_text().splitlines()) == 3  # one line per record for any reader
    # an output written by an older version: the separators raw inside the strings, in responses too
    raw = [{**r, "response": r["response"] + "\u2028\x85"} for r in records]
    (out / "predictions.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in raw))
    assert predict(out, checkpoint, prompts) == raw  # read, reused, written back


def test_overwrite_keeps_the_old_output_until_the_new_one_is_written(predicted, monkeypatch):
    """Issue: --predictions.overwrite deleted the old output first, and a failing run then left nothing."""
    from dllm.module import DLLMModule

    out, checkpoint, prompts, records = predicted
    metrics = out / "predictions.metrics.json"
    metrics.write_text("{}")
    with monkeypatch.context() as patched:
        patched.setattr(DLLMModule, "predict_step", lambda *args, **kwargs: 1 / 0)
        with pytest.raises(ZeroDivisionError):
            predict(out, checkpoint, prompts, "--model.generation.mode", "jacobi", "--predictions.overwrite", "true")
    assert read(out / "predictions.jsonl") == records and metrics.read_text() == "{}"
    again = predict(out, checkpoint, prompts, "--model.generation.mode", "jacobi", "--predictions.overwrite", "true")
    assert [r["settings"]["mode"] for r in again] == ["jacobi"] * 3
    assert not metrics.exists()  # no reference in these prompts: the old scores are gone with the old output


def test_another_chat_template_stops_reuse(predicted):
    """Issue: a rerun with --data.chat_template false reused the records made with the template."""
    out, checkpoint, prompts, records = predicted
    with pytest.raises(UserError, match=r"id 'a' was written for another rendered prompt \(data.chat_template"):
        predict(out, checkpoint, prompts, "--data.chat_template", "false")
    with pytest.raises(UserError, match=r"another rendered prompt"):
        predict(out, checkpoint, prompts, "--data.chat_template", "{{ 'Question: ' + messages[0]['content'] }}")
    assert read(out / "predictions.jsonl") == records


@pytest.mark.parametrize("option", [["--model.dtype", "float64"], ["--model.attn_implementation", "eager"]])
def test_model_options_with_a_checkpoint_stop_reuse(predicted, option):
    """Issue: with --ckpt_path, model.dtype and attn_implementation were not part of what must match."""
    out, checkpoint, prompts, records = predicted
    with pytest.raises(UserError, match=r"id 'a' was written by another model"):
        predict(out, checkpoint, prompts, *option)
    assert read(out / "predictions.jsonl") == records


def test_the_model_fingerprint_covers_every_byte_and_the_model_options(tmp_path, monkeypatch):
    """Issue: a size + last-MiB fingerprint did not change when only layer 0 of a safetensors file changed."""
    from dllm.data import predictions

    weights = tmp_path / "model.safetensors"
    data = bytearray(os.urandom(3 << 20))
    weights.write_bytes(bytes(data))
    before = model_fingerprint(str(weights), {})
    data[100] ^= 1  # a byte of the first tensor, far from the file's last MiB
    weights.write_bytes(bytes(data))
    assert model_fingerprint(str(weights), {}) != before
    assert model_fingerprint(str(weights), {"dtype": "bfloat16"}) != model_fingerprint(str(weights), {})
    assert model_fingerprint(str(weights), {"tokenizer": "t"}) != model_fingerprint(str(weights), {})

    # big files keep their hash in a cache keyed by path, size, mtime and inode
    monkeypatch.setenv("DLLM_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(predictions, "CACHED_HASH_BYTES", 1)
    first = predictions.file_sha256(weights)
    cache = json.loads((tmp_path / "cache" / "file-hashes.json").read_text())
    assert cache[str(weights.resolve())]["sha256"] == first
    cache[str(weights.resolve())]["sha256"] = "served from the cache"
    (tmp_path / "cache" / "file-hashes.json").write_text(json.dumps(cache))
    assert predictions.file_sha256(weights) == "served from the cache"
    data[200] ^= 1
    weights.write_bytes(bytes(data))
    os.utime(weights, ns=(1, 1))  # a rewrite gets a new mtime
    assert predictions.file_sha256(weights) not in (first, "served from the cache")


def test_records_of_another_tokenizer_are_not_reused():
    from dllm.data.predictions import mismatch

    record = {"checkpoint": "m@1", "tokenizer": "t@1", "settings": {}, "prompt": "p", "prompt_digest": "d"}
    assert mismatch({"a": record}, {"a": "p"}, {}, "m@1", "t@1", {"a": "d"}) is None
    assert "another tokenizer (t@1; this run: t@2)" in mismatch({"a": record}, {"a": "p"}, {}, "m@1", "t@2", {"a": "d"})


@pytest.mark.parametrize("content", ["", "{", "[]", "null", '{"host": "h"}'])
def test_an_empty_or_corrupt_lock_is_taken_over(predicted, content, caplog):
    """Issue: an empty or corrupt lock was never taken over ("pid None on None")."""
    out, checkpoint, prompts, records = predicted
    lock = out / "predictions.jsonl.lock"
    lock.write_text(content)
    assert predict(out, checkpoint, prompts) == records
    assert not lock.exists() and "removed an empty or unreadable lock" in caplog.text


def test_exact_tokens_round_trip_from_predict_to_train_file_and_cut_answers_train_without_eos(
    predicted, tmp_path, caplog
):
    """Predict records carry response_ids and the tokenizer; train_file trains on exactly those ids."""
    out, _, _, records = predicted
    assert all(r["finish_reason"] == "length" for r in records)  # 6 new tokens: every answer is cut
    assert all(len(r["response_ids"]) == r["new_tokens"] and r["tokenizer"].startswith("ByT5") for r in records)
    train = out / "predictions.jsonl"
    args = ["--data.task", "null", "--data.train_file", str(train), "--data.val_file", str(train),
            "--trainer.logger", "false"]  # fmt: skip
    cli = fit(tmp_path / "run", 1, *args)
    assert "training on the recorded token ids (response_ids) of 3 of 3 records" in caplog.text
    by_id = {r["id"]: r for r in records}
    for item in cli.datamodule.train_set.items:
        assert item["response_ids"] == by_id[item["id"]]["response_ids"]  # no closing EOS: the answer was cut
        assert item["reference"] == by_id[item["id"]]["response"]

    caplog.clear()
    other = [{**r, "tokenizer": "other@0123456789abcdef", "finish_reason": "eos"} for r in records]
    train.write_text("".join(json.dumps(r) + "\n" for r in other))
    with pytest.warns(UserWarning, match=r"3 records carry response_ids of another tokenizer .*response text"):
        cli = fit(tmp_path / "run2", 1, *args)
    assert "training on the recorded token ids" not in caplog.text
    eos = cli.model.tokenizer.eos_token_id
    assert all(item["response_ids"][-1] == eos for item in cli.datamodule.train_set.items)


@pytest.mark.parametrize(
    "script, args, body, message",
    [
        ("predict.py", ["--config", "configs/predict-tiny.yaml", "--data.prompts_file", "p.txt"], b"1+1=\ncaf\xe9\n",
         "error: p.txt:2: not UTF-8 text (byte offset 8: 0xe9)"),
        ("train.py", ["fit", "--config", "configs/tiny.yaml", "--data.task", "null", "--data.train_file", "p.jsonl"],
         b'{"prompt": "1", "response": "2"}\n{"prompt": " ", "response": "2"}\n', "error: p.jsonl:2: empty prompt"),
    ],
)  # fmt: skip
def test_a_bad_data_file_is_one_line_before_the_model_loads(script, args, body, message, tmp_path):
    """A model that cannot load (no such folder, no hub) shows the file's mistake was found first."""
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    (tmp_path / args[-1]).write_bytes(body)
    result = run_script(script, *args, "--model.pretrained", "no/such-model")
    assert result.returncode == 2, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(message), result.stderr[-3000:]

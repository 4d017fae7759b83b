"""A fuzz test of the record path: hostile Unicode through every prompts format -> predict -> resume -> train_file.

Every prompt, reference, extra field and response must come back exactly, or the run must stop with one
line naming the file and line. The responses are planted (a random tiny model writes random bytes), so
the line separators, NULs and 10k-character strings reach the predictions file, the resume and training.
"""

import json
import random
from pathlib import Path

import pytest
from conftest import SMALL_MODEL

from dllm.cli import DLLMCLI
from dllm.data import DLLMDataModule
from dllm.data.tokenizer import load_tokenizer, tokenizer_fingerprint
from dllm.errors import UserError
from dllm.module import DLLMModule

ROOT = Path(__file__).resolve().parents[2]

# every character Python, JSON or a tool may take for a line end, and other text that breaks naive code
SEPARATORS = ["\n", "\r", "\r\n", "\v", "\f", "\x1c", "\x1d", "\x1e", "\x85", "\u2028", "\u2029"]
ODD = ["\x00", "\ufeff", "\u200f", "\u202e", "\u2067", "\u200d", "\t", '"', "\\", "\\u2028", "\x7f", "\ufffd"]
WORDS = ["1+1=", "café", "naïve", "日本語", "مرحبا", "שלום", "😀", "👍🏽", "👨‍👩‍👧", "🏳️‍🌈", "e\u0301", " ", "a", "Z"]


def hostile(rng: random.Random, length: int) -> str:
    """A string of ``length`` pieces drawn from separators, odd characters and words of many scripts."""
    pieces = [rng.choice(rng.choice([SEPARATORS, ODD, WORDS, WORDS])) for _ in range(length)]
    text = "".join(pieces)
    return text if text.strip() else text + "x"  # a blank prompt is an error of its own (tested below)


def txt_line(rng: random.Random) -> str:
    """A prompt a .txt line can hold: no newline, no \\r before it, visible text, no leading byte-order mark."""
    while True:
        text = hostile(rng, rng.randint(1, 8)).replace("\n", "").rstrip("\r").lstrip("\ufeff")
        if text.strip():
            return text


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("hf") / "tiny"
    DLLMModule(model_config=SMALL_MODEL, tokenizer="byte").save_hf(str(path))
    return path


def write_prompts(path: Path, records: list[dict]) -> None:
    if path.suffix == ".txt":
        path.write_text("".join(r["prompt"] + "\n" for r in records), encoding="utf-8", newline="")
    elif path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    elif path.suffix == ".json":
        path.write_text(json.dumps(records, ensure_ascii=True, indent=1), encoding="utf-8")
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        columns = {key: [r[key] for r in records] for key in records[0]}
        columns["note"] = pa.array([note.encode() for note in columns["note"]], pa.binary())  # UTF-8 bytes
        pq.write_table(pa.table(columns), path)


class PlantedResponses:
    """Wraps ``generate_records``: the model runs, then each response is replaced by a hostile one; counts calls."""

    def __init__(self, responses: dict[str, str]):
        self.responses, self.calls = responses, 0
        self.real = DLLMModule.generate_records

    def method(self):
        def generate_records(module: DLLMModule, batch: dict, **overrides) -> list[dict]:
            self.calls += 1
            records = self.real(module, batch, **overrides)
            for record in records:
                record["response"] = self.responses[record["id"]]
                record["response_ids"] = module.tokenizer(record["response"], add_special_tokens=False).input_ids
            return records

        return generate_records


def predict(pretrained: Path, prompts: Path, output: Path) -> list[dict]:
    DLLMCLI(
        args=["predict", "--config", str(ROOT / "configs/predict-tiny.yaml"), "--model.pretrained", str(pretrained),
              "--trainer.enable_progress_bar", "false", "--data.prompts_file", str(prompts),
              "--predictions.output", str(output), "--predictions.echo", "false", "--data.val_batch_size", "4",
              "--model.generation.max_new_tokens", "3"],
        save_config_callback=None,
    )  # fmt: skip
    text = output.read_text(encoding="utf-8")
    assert len(text.splitlines()) == text.count("\n")  # no line separator a line splitter would see, but \n
    return [json.loads(line) for line in text.split("\n")[:-1]]


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("suffix", [".txt", ".jsonl", ".json", ".parquet"])
def test_hostile_unicode_round_trips_through_predict_resume_and_train_file(
    pretrained, tmp_path, monkeypatch, caplog, suffix, seed
):
    if suffix == ".parquet":
        pytest.importorskip("pyarrow")
    rng = random.Random(f"{suffix}{seed}")
    n = 6
    if suffix == ".txt":
        inputs = [{"prompt": txt_line(rng)} for _ in range(n)]
        ids = [str(i) for i in range(n)]  # a .txt prompt's id is its index
    else:
        long = hostile(rng, 10_000)[:10_000]
        inputs = [
            {"id": f"r{i}\u2028{i}", "prompt": hostile(rng, rng.randint(1, 8)), "response": hostile(rng, 12),
             "note": long if i == 1 else hostile(rng, 5)}
            for i in range(n)
        ]  # fmt: skip
        if suffix != ".parquet":  # a parquet column holds one type: strings here
            inputs[2]["prompt"] = [{"role": "user", "content": [{"type": "text", "text": hostile(rng, 4)}]}]
        ids = [r["id"] for r in inputs]
    responses = {i: hostile(rng, 10) for i in ids}
    responses[ids[0]] = hostile(rng, 10_000)[:10_000]
    planted = PlantedResponses(responses)
    monkeypatch.setattr(DLLMModule, "generate_records", planted.method())
    prompts, output = tmp_path / f"prompts{suffix}", tmp_path / "out" / "predictions.jsonl"
    write_prompts(prompts, inputs)

    records = predict(pretrained, prompts, output)
    assert [r["id"] for r in records] == ids and planted.calls == 2  # 6 prompts in batches of 4
    for record, given in zip(records, inputs):
        assert record["prompt"] == given["prompt"] and record["response"] == responses[record["id"]]
        assert record.get("reference") == given.get("response") and record.get("note") == given.get("note")

    assert predict(pretrained, prompts, output) == records and planted.calls == 2  # resumed: every record reused

    tokenizer = load_tokenizer("byte")
    data = DLLMDataModule(train_file=str(output), val_file=str(output), max_length=100_000, tokenizer=tokenizer)
    data.setup("fit")
    assert f"training on the recorded token ids (response_ids) of {n} of {n} records" in caplog.text
    assert all(r["tokenizer"].split("@")[1] == tokenizer_fingerprint(tokenizer).split("@")[1] for r in records)
    by_id = {r["id"]: r for r in records}
    assert sorted(item["id"] for item in data.train_set.items) == sorted(ids)
    for item in data.train_set.items:
        record = by_id[item["id"]]
        assert item["prompt"] == record["prompt"] and item["reference"] == record["response"]
        eos = [tokenizer.eos_token_id] if record["finish_reason"] == "eos" else []
        assert item["response_ids"] == record["response_ids"] + eos


@pytest.mark.parametrize(
    "suffix, body, message",
    [
        (".jsonl", '{"prompt": "ok"}\n{"prompt": "half \\ud83d an emoji"}\n', r"{path}:2: a lone surrogate \\ud83d"),
        (".json", '[{"prompt": "ok"}, {"prompt": "\\udc00"}]', r"{path}: record 1: a lone surrogate \\udc00"),
        (".txt", b"ok\nsurrogate \xed\xa0\x80 as bytes\n", r"{path}:2: not UTF-8 text \(byte offset 13: 0xed\)"),
        (".jsonl", '{"prompt": "ok"}\n{"prompt": "\\u2028 \\f"}\n', r"{path}:2: empty prompt \('prompt'\)"),
        (".jsonl", '{"prompt": "ok"}\n\f\n', r"{path}:2: malformed JSON: Expecting value at column 1"),
    ],
)  # fmt: skip
def test_what_cannot_round_trip_stops_in_one_line_naming_the_file_and_line(pretrained, tmp_path, suffix, body, message):
    prompts = tmp_path / f"prompts{suffix}"
    if isinstance(body, bytes):
        prompts.write_bytes(body)
    else:
        prompts.write_text(body, encoding="utf-8")
    with pytest.raises(UserError) as error:
        predict(pretrained, prompts, tmp_path / "out.jsonl")
    assert "\n" not in str(error.value)
    assert error.match("^" + message.format(path=prompts))
    assert not (tmp_path / "out.jsonl").exists()

"""The data side: files and arguments checked early, chat templates, predictions as training data, references.

Everything runs on the byte tokenizer; real chat templates (DeepSeek-R1 distills, Qwen2.5) are set
on it as Jinja strings, so nothing is downloaded.
"""

import datetime
import json
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
from conftest import SMALL_MODEL
from lightning.fabric.utilities.distributed import DistributedSamplerWrapper
from torch.utils.data import DistributedSampler

from dllm.cli import DLLMCLI
from dllm.data import DLLMDataModule
from dllm.data.batching import EpochSampler, ListDataset, ResumableDataLoader
from dllm.data.examples import encode_example
from dllm.data.records import check_arguments
from dllm.data.tokenizer import load_tokenizer, render_chat, response_text
from dllm.errors import UserError
from dllm.generation import GenerationSettings
from dllm.module import DLLMModule
from dllm.tasks import generate_examples

ROOT = Path(__file__).resolve().parents[2]

# The chat template of deepseek-ai/DeepSeek-R1-Distill-Qwen-*, as in its tokenizer_config.json.
R1_TEMPLATE = (
    "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}"
    "{% set ns = namespace(is_first=false, is_tool=false, is_output_first=true, system_prompt='') %}"
    "{%- for message in messages %}{%- if message['role'] == 'system' %}{% set ns.system_prompt = message['content'] %}"
    "{%- endif %}{%- endfor %}{{bos_token}}{{ns.system_prompt}}{%- for message in messages %}"
    "{%- if message['role'] == 'user' %}{%- set ns.is_tool = false -%}{{'<｜User｜>' + message['content']}}{%- endif %}"
    "{%- if message['role'] == 'assistant' and message['content'] is none %}{%- set ns.is_tool = false -%}"
    "{%- for tool in message['tool_calls']%}{%- if not ns.is_first %}{{'<｜Assistant｜><｜tool▁calls▁begin｜>"
    "<｜tool▁call▁begin｜>' + tool['type'] + '<｜tool▁sep｜>' + tool['function']['name'] + '\\n' + '```json' + '\\n'"
    " + tool['function']['arguments'] + '\\n' + '```' + '<｜tool▁call▁end｜>'}}{%- set ns.is_first = true -%}"
    "{%- else %}{{'\\n' + '<｜tool▁call▁begin｜>' + tool['type'] + '<｜tool▁sep｜>' + tool['function']['name'] + '\\n'"
    " + '```json' + '\\n' + tool['function']['arguments'] + '\\n' + '```' + '<｜tool▁call▁end｜>'}}"
    "{{'<｜tool▁calls▁end｜><｜end▁of▁sentence｜>'}}{%- endif %}{%- endfor %}{%- endif %}"
    "{%- if message['role'] == 'assistant' and message['content'] is not none %}{%- if ns.is_tool %}"
    "{{'<｜tool▁outputs▁end｜>' + message['content'] + '<｜end▁of▁sentence｜>'}}{%- set ns.is_tool = false -%}"
    "{%- else %}{% set content = message['content'] %}{% if '</think>' in content %}"
    "{% set content = content.split('</think>')[-1] %}{% endif %}"
    "{{'<｜Assistant｜>' + content + '<｜end▁of▁sentence｜>'}}{%- endif %}{%- endif %}"
    "{%- if message['role'] == 'tool' %}{%- set ns.is_tool = true -%}{%- if ns.is_output_first %}"
    "{{'<｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>' + message['content'] + '<｜tool▁output▁end｜>'}}"
    "{%- set ns.is_output_first = false %}{%- else %}{{'\\n<｜tool▁output▁begin｜>' + message['content'] + "
    "'<｜tool▁output▁end｜>'}}{%- endif %}{%- endif %}{%- endfor -%}{% if ns.is_tool %}{{'<｜tool▁outputs▁end｜>'}}"
    "{% endif %}{% if add_generation_prompt and not ns.is_tool %}{{'<｜Assistant｜><think>\\n'}}{% endif %}"
)

# The chat template of Qwen/Qwen2.5-*-Instruct without its tool-calling branches.
QWEN25_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if (message.role == 'user') or (message.role == 'system' and not loop.first) or "
    "(message.role == 'assistant') %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("byte")


def with_template(template: str | None):
    tok = load_tokenizer("byte")
    tok.chat_template = template
    return tok


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def pairs(n: int, start: int = 0) -> list[dict]:
    return [{"prompt": f"{i}+{i}=", "response": str(2 * i)} for i in range(start, start + n)]


def cli_error(args: list[str], capsys) -> str:
    """The one-line message of a user mistake, whether the CLI raises it or prints it and exits 2."""
    try:
        DLLMCLI(args=args, run=True)
    except UserError as e:
        return str(e)
    except SystemExit as e:
        assert e.code == 2, e.code
        return capsys.readouterr().err
    raise AssertionError("no error")


# --- files and arguments, checked before anything loads ------------------------------------------------


@pytest.mark.parametrize("name", ["train_file", "val_file", "prompts_file"])
def test_a_missing_file_names_the_argument_and_path(tmp_path, name):
    missing = str(tmp_path / "nope.jsonl")
    arguments = {"train_file": str(write_jsonl(tmp_path / "train.jsonl", pairs(4)))} if name == "val_file" else {}
    with pytest.raises(UserError, match=rf"data\.{name}: no such file: .*nope\.jsonl"):
        check_arguments({**arguments, name: missing})  # no tokenizer, no model: the CLI can run it first
    with pytest.raises(UserError, match=rf"data\.{name}: no such file"):
        DLLMDataModule(**arguments, **{name: missing})


def test_train_file_and_task_together_fail_naming_the_conflict(tmp_path):
    train = str(write_jsonl(tmp_path / "train.jsonl", pairs(8)))
    with pytest.raises(UserError, match=r"data\.train_file=.*data\.task='addition'.*--data\.task null"):
        DLLMDataModule(train_file=train, task="addition")
    with pytest.raises(UserError, match=r"data\.prompt and data\.prompts_file.*--data\.prompts_file null"):
        DLLMDataModule(prompt="1+1=", prompts_file=str(ROOT / "examples/prompts.txt"))
    with pytest.raises(UserError, match=r"set data\.prompts_file or data\.prompt"):
        check_arguments({}, stage="predict")
    with pytest.raises(UserError, match=r"data\.chat_template must be true, false or a Jinja template"):
        DLLMDataModule(chat_template="none")


def test_train_file_under_the_task_config_is_not_silently_ignored(tmp_path, capsys, monkeypatch):
    """Issue: `--data.train_file` under configs/tiny.yaml (which sets data.task) trained on the task."""
    monkeypatch.chdir(tmp_path)
    # max_steps 1: a regression (training on the task instead) stays short
    config = ["fit", "--config", str(ROOT / "configs/tiny.yaml"), "--model.model_config", json.dumps(SMALL_MODEL),
              "--trainer.logger", "false", "--trainer.max_steps", "1", "--trainer.val_check_interval", "1"]  # fmt: skip
    message = cli_error([*config, "--data.train_file", "missing.jsonl"], capsys)
    assert "data.train_file" in message and "missing.jsonl" in message
    write_jsonl(tmp_path / "train.jsonl", pairs(8))
    message = cli_error([*config, "--data.train_file", "train.jsonl"], capsys)
    assert "data.task" in message and "--data.task null" in message


def test_a_prompts_file_that_is_a_folder_is_named_as_one(tmp_path):
    """Issue 23: a folder given as the prompts file was reported as "no such file"."""
    with pytest.raises(UserError, match=rf"data\.prompts_file: {tmp_path} is a folder, not a file"):
        check_arguments({"prompts_file": str(tmp_path)})


def test_training_data_too_small_for_the_devices_names_batch_size_and_devices(tmp_path, tokenizer):
    """Issue 23: 10 examples over 2 devices at batch 8 dropped every batch; the fit ended at step 0 with exit 0.

    A file's size is known only once it is read, so the loader checks it (the CLI checks ``data.num_train``).
    """
    train = write_jsonl(tmp_path / "train.jsonl", pairs(10))
    data = DLLMDataModule(train_file=str(train), val_file=str(train), batch_size=8, tokenizer=tokenizer)
    data.setup("fit")
    data.trainer = SimpleNamespace(world_size=2)
    with pytest.raises(UserError, match=r"--data\.batch_size 8: more than the 5 training examples each of 2 devices"):
        data.train_dataloader()
    data.trainer = SimpleNamespace(world_size=1)  # one device trains on what there is
    assert len(data.train_dataloader()) == 1


# --- chat templates and the response overlap -----------------------------------------------------------


def test_response_starting_like_the_prompt_ends_is_kept_whole_without_a_template(tokenizer):
    """Issue: the overlap rule ate '<html>' because the user's prompt ended with it."""
    prompt, response = "Write HTML starting with <html>", "<html><body>hi</body></html>"
    raw = with_template(None)
    assert render_chat(raw, prompt) == (prompt, "")
    assert encode_example(raw, prompt, response)[2] == response
    assert encode_example(tokenizer, prompt, response, chat_template=False)[2] == response
    assert encode_example(tokenizer, prompt, response)[2] == response  # byte template: "Q: ...\nA: "
    assert response_text(response) == response


def test_r1_template_writes_the_think_tag_once():
    tok = with_template(R1_TEMPLATE)
    text, opening = render_chat(tok, "What is 2+2?")
    assert text == "<｜User｜>What is 2+2?<｜Assistant｜><think>\n" and opening == "<｜Assistant｜><think>\n"
    prompt_ids, response_ids, written = encode_example(tok, "What is 2+2?", "<think>\nadd them\n</think>\n\n4")
    assert written == "add them\n</think>\n\n4"
    full = tok.decode(prompt_ids + response_ids)
    assert full == "<｜User｜>What is 2+2?<｜Assistant｜><think>\nadd them\n</think>\n\n4</s>"
    assert full.count("<think>") == 1
    # a response that does not open with the tag, and a prompt that ends with a tag, stay whole
    assert encode_example(tok, "What is 2+2?", "4")[2] == "4"
    html = "<html><body>hi</body></html>"
    assert encode_example(tok, "Write HTML starting with <html>", html)[2] == html


def test_qwen25_template_removes_nothing():
    tok = with_template(QWEN25_TEMPLATE)
    text, opening = render_chat(tok, [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}])
    assert text == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert opening == "<|im_start|>assistant\n"
    for response in ("<think>\nhm\n</think>\n\nHello", "<html>hi</html>", "assistant\nHello"):
        assert encode_example(tok, "Write HTML starting with <html>", response)[2] == response


def test_chat_template_false_true_or_a_string(tmp_path, tokenizer):
    prompts = str(write_jsonl(tmp_path / "p.jsonl", [{"prompt": "7+8="}]))

    def prompt_text(**kwargs) -> str:
        data = DLLMDataModule(prompts_file=prompts, tokenizer=tokenizer, **kwargs)
        data.setup("predict")
        return tokenizer.decode(data.predict_set.items[0]["prompt_ids"])

    assert prompt_text() == "Q: 7+8=\nA: "  # the tokenizer's own
    assert prompt_text(chat_template=False) == "7+8="  # raw, for base models
    assert prompt_text(chat_template=R1_TEMPLATE) == "<｜User｜>7+8=<｜Assistant｜><think>\n"
    assert tokenizer.chat_template.startswith("{% for message")  # the shared tokenizer is untouched


def test_chat_template_and_prompt_command_line_syntax(tmp_path):
    """The documented spellings of data.chat_template and data.prompt parse as intended."""

    def data_of(*args: str) -> DLLMDataModule:
        cli = DLLMCLI(args=["--model.model_config", json.dumps(SMALL_MODEL), *args], run=False)
        return cli.datamodule

    assert data_of("--data.chat_template", "false").hparams.chat_template is False
    assert data_of("--data.chat_template", "true").hparams.chat_template is True
    assert data_of("--data.chat_template", "{{ messages[0]['content'] }}").hparams.chat_template.startswith("{{")
    assert data_of("--data.prompt", "12+34=").hparams.prompt == "12+34="
    assert data_of("--data.prompt+", "1+2=", "--data.prompt+", "3+4=").hparams.prompt == ["1+2=", "3+4="]
    assert data_of("--data.prompt", '["1+2=", "3+4="]').hparams.prompt == ["1+2=", "3+4="]


# --- training records: empty and cut responses ----------------------------------------------------------


def test_empty_responses_are_skipped_with_a_count_and_cut_ones_train_without_eos(tmp_path):
    tok = with_template(R1_TEMPLATE)
    records = [
        *pairs(3),
        {"prompt": "a", "response": ""},
        {"prompt": "b", "response": "  \n"},
        {"prompt": "c", "response": "<think>\n"},  # empty once the template's own <think>\n is not repeated
        {"prompt": "d", "response": "12", "finish_reason": "length"},
        {"prompt": "e", "response": "34", "finish_reason": "eos"},
    ]
    path = write_jsonl(tmp_path / "train.jsonl", records)
    data = DLLMDataModule(train_file=str(path), val_file=str(path), tokenizer=tok)
    with pytest.warns(UserWarning) as caught:
        data.setup("fit")
    messages = [str(w.message) for w in caught if "skipped" in str(w.message)]
    assert len(messages) == 2  # one per file (train and val)
    assert messages[0].endswith(f"skipped 3 of 8 records: 3 with an empty response (first: {path}:4)")
    items = data.train_set.items
    assert [it["reference"] for it in items] == ["0", "2", "4", "12", "34"]
    eos = tok.eos_token_id
    assert items[3]["response_ids"] == tok("12", add_special_tokens=False).input_ids  # cut: no closing EOS
    assert items[4]["response_ids"] == [*tok("34", add_special_tokens=False).input_ids, eos]

    only_empty = write_jsonl(tmp_path / "empty.jsonl", [{"prompt": "a", "response": " "}])
    data = DLLMDataModule(train_file=str(only_empty), val_file=str(only_empty), tokenizer=tok)
    with pytest.raises(UserError, match=r"no usable examples \(skipped 1 with an empty response"):
        data.setup("fit")


@pytest.mark.parametrize("prompt", ["", " \u2028 ", [{"role": "user", "content": ""}]])
def test_an_empty_training_prompt_is_rejected_at_setup_naming_the_line(tmp_path, tokenizer, prompt):
    """Issue: it passed setup and crashed validation generation with 'input_ids row 0 is empty'."""
    path = write_jsonl(tmp_path / "train.jsonl", [*pairs(3), {"prompt": prompt, "response": "1"}])
    for chat_template in (True, False):
        data = DLLMDataModule(
            train_file=str(path), val_file=str(path), tokenizer=tokenizer, chat_template=chat_template
        )
        with pytest.raises(UserError, match=rf"^{path}:4: empty prompt \('prompt'\)"):
            data.setup("fit")


def test_a_predictions_file_trains_as_is(tmp_path, tokenizer):
    """Self-distillation: predict's JSONL records (every field they carry) are a valid data.train_file."""
    module = DLLMModule(model_config=SMALL_MODEL, tokenizer="byte", generation=GenerationSettings(max_new_tokens=6))
    prompts = [{"id": f"q{i}", "prompt": f"{i}+{i}=", "response": str(2 * i), "source": "demo"} for i in range(6)]
    data = DLLMDataModule(prompts_file=str(write_jsonl(tmp_path / "prompts.jsonl", prompts)), tokenizer=tokenizer)
    data.setup("predict")
    cut = module.generate_records(data._collate()(data.predict_set.items))  # an untrained model never stops
    assert {r["finish_reason"] for r in cut} == {"length"}
    assert list(cut[0]) == [
        "source", "id", "prompt", "response", "reference", "new_tokens", "finish_reason", "forwards", "settings",
        "response_ids",
    ]  # fmt: skip
    # the same records as a model that stopped would write them (a response that differs from the reference)
    stopped = [{**r, "id": f"{r['id']}-eos", "response": f"{r['reference']}!", "finish_reason": "eos"} for r in cut]
    for r in stopped:
        r["response_ids"] = tokenizer(r["response"], add_special_tokens=False).input_ids
    path = write_jsonl(tmp_path / "predictions.jsonl", [*cut, *stopped])

    data = DLLMDataModule(train_file=str(path), val_file=str(path), batch_size=2, tokenizer=tokenizer)
    data.setup("fit")  # no skips: the cut answers train too, without a closing EOS
    assert [it["id"] for it in data.train_set.items] == [r["id"] for r in [*cut, *stopped]]
    assert [it["reference"] for it in data.train_set.items] == [r["response"] for r in [*cut, *stopped]]
    eos = tokenizer.eos_token_id
    assert [it["response_ids"][-1] == eos for it in data.train_set.items] == [False] * 6 + [True] * 6
    trainer = L.Trainer(
        accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0, default_root_dir=tmp_path,
    )  # fmt: skip
    trainer.fit(module, datamodule=data)
    assert trainer.global_step == 1


# --- prompts to predict: budgets, references, extra fields ------------------------------------------------


def _predict_trainer(tmp_path) -> L.Trainer:
    return L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, default_root_dir=tmp_path)


def test_a_prompt_too_long_names_file_line_and_both_budgets(tmp_path):
    """Issue: it said 'input_ids row 0' from inside generation, after the model had loaded."""
    module = DLLMModule(model_config=SMALL_MODEL, tokenizer="byte", generation=GenerationSettings(max_length=24))
    path = tmp_path / "prompts.txt"
    path.write_text("1+1=\n\n" + "9" * 30 + "=\n")  # line 3: 31 characters + the template's 'Q: ', '\nA: '
    data = DLLMDataModule(prompts_file=str(path), max_length=256, tokenizer=module.tokenizer)
    with pytest.raises(UserError) as error:
        _predict_trainer(tmp_path).predict(module, datamodule=data)
    message = str(error.value)
    assert message.startswith(f"{path}:3: the prompt is 38 tokens after the chat template")
    assert "data.max_length=256" in message and "model.generation.max_length=24" in message
    assert "\n" not in message
    data = DLLMDataModule(prompts_file=str(path), max_length=30, tokenizer=module.tokenizer)
    with pytest.raises(UserError, match=rf"{path}:3: .* shorter than data.max_length=30"):
        data.setup("predict")  # no module attached: data.max_length alone


def test_validation_prompts_must_fit_the_generation_budget(tmp_path):
    module = DLLMModule(model_config=SMALL_MODEL, tokenizer="byte", generation=GenerationSettings(max_length=8))
    data = DLLMDataModule(task="addition", num_train=16, num_val=4, max_length=256, tokenizer=module.tokenizer)
    trainer = L.Trainer(
        accelerator="cpu", max_steps=1, logger=False, enable_progress_bar=False, default_root_dir=tmp_path
    )
    with pytest.raises(
        UserError,
        match=r"task addition val addition-val-00000: the validation prompt is 13 tokens .*generation.max_length=8",
    ):
        trainer.fit(module, datamodule=data)


def test_prompts_from_the_command_line_get_ids_in_order(tokenizer):
    data = DLLMDataModule(prompt=["1+1=", "2+2="], tokenizer=tokenizer)
    data.setup("predict")
    assert data.all_prompt_ids() == ["prompt-0", "prompt-1"]
    assert [it["prompt"] for it in data.predict_set.items] == ["1+1=", "2+2="]
    single = DLLMDataModule(prompt="3+3=", tokenizer=tokenizer)
    single.setup("predict")
    assert single.all_prompt_ids() == ["prompt-0"] and single.predict_set.items[0]["reference"] is None
    with pytest.raises(UserError, match=r"data\.prompt\[1\]: expected a non-empty string"):
        DLLMDataModule(prompt=["1+1=", " "])


def test_records_carry_the_reference_and_the_inputs_extra_fields(tmp_path):
    module = DLLMModule(model_config=SMALL_MODEL, tokenizer="byte", generation=GenerationSettings(max_new_tokens=3))
    inputs = [
        {"id": "a", "prompt": "1+1=", "response": "2", "source": "x"},
        {"id": "b", "prompt": "2+2=", "answer": 4, "meta": {"k": [1]}},
        {"prompt": "3+3=", "settings": "stale", "new_tokens": -1},  # output keys of the input are replaced
    ]
    path = write_jsonl(tmp_path / "prompts.jsonl", inputs)
    data = DLLMDataModule(prompts_file=str(path), tokenizer=module.tokenizer)
    data.setup("predict")
    batch = data._collate()(data.predict_set.items)
    assert batch["reference"] == ["2", "4", None] and batch["answer"] == [None, 4, None]
    records = module.generate_records(batch)
    assert list(records[0]) == [
        "source", "id", "prompt", "response", "reference", "new_tokens", "finish_reason", "forwards", "settings",
        "response_ids",
    ]  # fmt: skip
    assert (records[0]["reference"], records[0]["source"]) == ("2", "x")
    assert (records[1]["reference"], records[1]["answer"], records[1]["meta"]) == ("4", 4, {"k": [1]})
    assert "reference" not in records[2] and records[2]["id"] == "2" and records[2]["new_tokens"] >= 1
    assert isinstance(records[2]["settings"], dict)

    data = DLLMDataModule(prompts_file=str(path), reference_key="answer", tokenizer=module.tokenizer)
    with pytest.raises(UserError, match=rf"{path}:1: missing key 'answer' \(data\.reference_key"):
        data.setup("predict")


def test_parquet_prompts_carry_fields_json_cannot_hold_as_text(tmp_path):
    """A parquet column of timestamps reaches the prediction (as text) instead of failing at the write."""
    pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
    when = datetime.datetime(2026, 1, 2, 3, 4, 5)
    table = pa.table({"id": ["a", "b"], "prompt": ["1+1=", "2+2="], "asked": [when, when], "n": [1, 2]})
    pq.write_table(table, tmp_path / "prompts.parquet")
    module = DLLMModule(model_config=SMALL_MODEL, tokenizer="byte", generation=GenerationSettings(max_new_tokens=2))
    data = DLLMDataModule(prompts_file=str(tmp_path / "prompts.parquet"), tokenizer=module.tokenizer)
    data.setup("predict")
    records = module.generate_records(data._collate()(data.predict_set.items))
    assert [(r["id"], r["asked"], r["n"]) for r in records] == [("a", str(when), 1), ("b", str(when), 2)]
    json.dumps(records)  # what the prediction writer does


def test_embedded_task_prompts_bring_reference_answer_and_task(tmp_path, tokenizer):
    examples = generate_examples("addition", "test", 3, seed=0)
    path = write_jsonl(tmp_path / "test.jsonl", examples)
    data = DLLMDataModule(prompts_file=str(path), tokenizer=tokenizer)
    data.setup("predict")
    batch = data._collate()(data.predict_set.items)
    assert batch["reference"] == [e["response"] for e in examples]
    assert batch["answer"] == [e["answer"] for e in examples] and batch["task"] == ["addition"] * 3
    assert batch["extra"][0] == {"answer": examples[0]["answer"], "task": "addition"}


# --- epoch order ----------------------------------------------------------------------------------------


def _orders(loader, epochs: int, set_epoch) -> list[list[int]]:
    orders = []
    for epoch in range(epochs):
        set_epoch(epoch)
        orders.append([i for batch in loader for i in batch.tolist()])
    return orders


def test_each_epoch_has_its_own_order_under_the_ddp_sampler_wrapper():
    """Lightning < 2.6 sets the epoch on its DDP wrapper only (DistributedSampler.set_epoch); the order must move."""
    sampler = DistributedSamplerWrapper(EpochSampler(16, seed=0), num_replicas=2, rank=0, shuffle=False)
    loader = ResumableDataLoader(ListDataset(list(range(16))), batch_size=4, sampler=sampler)
    orders = _orders(loader, 3, lambda epoch: DistributedSampler.set_epoch(sampler, epoch))
    assert all(sorted(order) == sorted(orders[0]) or len(order) == 8 for order in orders)
    assert len({tuple(order) for order in orders}) == 3
    direct = EpochSampler(16, seed=0)
    expected = []
    for epoch in range(3):
        direct.set_epoch(epoch)
        expected.append(list(direct)[0::2])  # rank 0 of 2: every other index of the epoch's order
    assert orders == expected


def test_two_epochs_train_in_different_orders(tmp_path):
    seen: list[list[str]] = []

    class Recorder(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if batch_idx == 0:
                seen.append([])
            seen[-1].extend(batch["id"])

    module = DLLMModule(model_config=SMALL_MODEL, tokenizer="byte")
    data = DLLMDataModule(task="addition", num_train=16, num_val=4, batch_size=4, tokenizer=module.tokenizer)
    trainer = L.Trainer(
        accelerator="cpu", max_epochs=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0, default_root_dir=tmp_path, callbacks=[Recorder()],
    )  # fmt: skip
    trainer.fit(module, datamodule=data)
    assert len(seen) == 2 and sorted(seen[0]) == sorted(seen[1]) and seen[0] != seen[1]


# --- hostile files: line separators, encodings, message parts, null ids, binary columns ----------------------


def _prompts_of(path: Path, tokenizer, **kwargs) -> list[dict]:
    data = DLLMDataModule(prompts_file=str(path), tokenizer=tokenizer, **kwargs)
    data.setup("predict")
    return data.predict_set.items


def test_a_txt_prompt_line_ends_only_at_a_newline(tmp_path, tokenizer):
    """Issue: str.splitlines made one .txt prompt with U+2028 or a form feed into two prompts, silently."""
    inner = ["a\u2028b", "c\x0cd", "e\x85f", "g\u2029h", "i\x0bj", "k\x1cl\x1dm\x1en", "o\rp"]
    path = tmp_path / "prompts.txt"
    path.write_bytes(("\ufeff" + "\n".join(inner[:3]) + "\r\n" + "\n".join(inner[3:]) + "\n\n  \n").encode())
    items = _prompts_of(path, tokenizer)
    assert [it["prompt"] for it in items] == inner  # the BOM dropped, \r\n read as \n, blank lines skipped
    assert [it["id"] for it in items] == [str(i) for i in range(len(inner))]


def test_jsonl_lines_end_only_at_a_newline_and_are_written_splitlines_safe(tmp_path, tokenizer):
    from dllm.data.records import read_records
    from dllm.data.records import write_jsonl as write_records

    text = "x\u2028y\u2029z\x85w"
    path = tmp_path / "raw.jsonl"  # as json.dumps(ensure_ascii=False) writes it: the separators raw
    path.write_text(json.dumps({"prompt": text}, ensure_ascii=False) + "\n", encoding="utf-8")
    assert [r["prompt"] for r in read_records(path)] == [text]
    out = tmp_path / "out.jsonl"
    write_records([{"prompt": text}], str(out), "1 prompt")
    assert len(out.read_text(encoding="utf-8").splitlines()) == 1  # escaped: any line splitter reads one line
    assert [r["prompt"] for r in read_records(out)] == [text]


@pytest.mark.parametrize("suffix", [".txt", ".jsonl", ".json"])
def test_a_file_that_is_not_utf8_names_file_line_and_byte_offset(tmp_path, tokenizer, suffix):
    """Issue: a Latin-1 file gave a UnicodeDecodeError traceback."""
    body = {".txt": "1+1=\ncafé\n", ".jsonl": '{"prompt": "1+1="}\n{"prompt": "café"}\n',
            ".json": '[{"prompt": "1+1="},\n{"prompt": "café"}]'}[suffix]  # fmt: skip
    path = tmp_path / f"prompts{suffix}"
    path.write_bytes(body.encode("latin-1"))
    offset = body.index("é")
    with pytest.raises(UserError, match=rf"^{path}:2: not UTF-8 text \(byte offset {offset}: 0xe9\)"):
        _prompts_of(path, tokenizer)
    path.write_bytes(b"\xef\xbb\xbf" + body.encode("utf-8"))  # UTF-8 with a byte-order mark just works
    assert [it["prompt"] for it in _prompts_of(path, tokenizer)] == ["1+1=", "café"]


def test_a_malformed_line_gets_the_whole_json_error_with_its_column(tmp_path, tokenizer):
    """Issue: the message was cut mid-phrase: 'malformed JSON (Invalid control character at)'."""
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt": "1+1="}\n{"prompt": "a\tb"}\n')
    with pytest.raises(UserError) as error:
        _prompts_of(path, tokenizer)
    assert str(error.value) == f"{path}:2: malformed JSON: Invalid control character at column 14"
    path = tmp_path / "prompts.json"
    path.write_text('[{"prompt": "1+1="},\n {"prompt": 1+}]')
    with pytest.raises(UserError) as error:
        _prompts_of(path, tokenizer)
    assert str(error.value) == f"{path}:2: malformed JSON: Expecting ',' delimiter at line 2 column 14"


def test_a_lone_surrogate_is_rejected_naming_the_line(tmp_path, tokenizer):
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt": "ok \\ud83d\\ude00"}\n{"prompt": "bad \\ud83d"}\n')  # a pair is an emoji
    with pytest.raises(UserError, match=rf"^{path}:2: a lone surrogate \\ud83d at character 4"):
        _prompts_of(path, tokenizer)


TEXT_PARTS = [{"type": "text", "text": "What is"}, {"type": "text", "text": "2+2?"}]


@pytest.mark.parametrize("chat_template", [True, False])
def test_openai_text_parts_are_joined_and_anything_else_is_named(tmp_path, tokenizer, chat_template):
    """Issue: content as a list of parts crashed inside the chat template; content null crashed without one."""
    messages = [{"role": "user", "content": TEXT_PARTS}]
    good = write_jsonl(tmp_path / "good.jsonl", [{"prompt": messages, "response": [
        {"role": "assistant", "content": [{"type": "text", "text": "4"}]}]}] * 4)  # fmt: skip
    items = _prompts_of(good, tokenizer, chat_template=chat_template)
    expected = "Q: What is\n2+2?\nA: " if chat_template else "What is\n2+2?"
    assert tokenizer.decode(items[0]["prompt_ids"]) == expected and items[0]["prompt"] == messages
    assert items[0]["reference"] == "4"
    data = DLLMDataModule(train_file=str(good), val_file=str(good), tokenizer=tokenizer, chat_template=chat_template)
    data.setup("fit")
    assert tokenizer.decode(data.train_set.items[0]["response_ids"]) == "4</s>"
    for content, said in [(None, "null"), ([{"type": "image_url", "image_url": {"url": "x"}}], "a 'image_url' part"),
                          (7, "a int"), ([], "an empty list")]:  # fmt: skip
        bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "1"}, {"prompt": [{"role": "user", "content": content}]}])
        with pytest.raises(UserError, match=rf"^{bad}:2: 'prompt' message 0: content must be a string or a list of "
                                            rf"text parts .*got {said}$"):  # fmt: skip
            _prompts_of(bad, tokenizer, chat_template=chat_template)


def test_a_null_id_is_no_id(tmp_path, tokenizer):
    """Issue: "id": null became the id 'None', and two of them a 'duplicate id' error."""
    path = write_jsonl(tmp_path / "p.jsonl", [{"id": None, "prompt": "1"}, {"id": "x", "prompt": "2"},
                                              {"id": None, "prompt": "3"}])  # fmt: skip
    assert [it["id"] for it in _prompts_of(path, tokenizer)] == ["0", "x", "2"]
    train = write_jsonl(tmp_path / "t.jsonl", [{"id": None, **r} for r in pairs(4)])
    data = DLLMDataModule(train_file=str(train), val_file=str(train), tokenizer=tokenizer)
    data.setup("fit")
    assert sorted(it["id"] for it in data.train_set.items) == ["0", "1", "2", "3"]


def test_parquet_binary_columns_are_decoded_or_named(tmp_path, tokenizer):
    """Issue: bytes reached the model as the text of a Python repr ("b'caf\\xc3\\xa9'")."""
    pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
    path = tmp_path / "p.parquet"
    pq.write_table(pa.table({"prompt": pa.array(["café".encode(), b"1+1="], pa.binary()), "n": [1, 2]}), path)
    assert [it["prompt"] for it in _prompts_of(path, tokenizer)] == ["café", "1+1="]
    pq.write_table(pa.table({"prompt": ["a", "b"], "blob": pa.array([b"ok", b"\xff\xfe"], pa.binary())}), path)
    with pytest.raises(UserError, match=rf"^{path}: row 1: column 'blob' holds bytes that are not UTF-8 text"):
        _prompts_of(path, tokenizer)

"""lm-evaluation-harness backend: ``--model dllm`` against lm-eval's own ``hf`` model, on a tiny random model.

The model writes printable ASCII only (its LM head rows of other bytes are zero) and EOS where it would
write ``2``, so responses are readable, one token per character, and some end early.
"""

import json
import logging
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from lm_eval.api.instance import Instance
from lm_eval.models.huggingface import HFLM

from dllm.evaluation import DLLM, METER
from dllm.evaluation.__main__ import main
from dllm.evaluation.tasks import TASKS_DIR, lm_eval_name, split_records
from dllm.module import DLLMModule
from dllm.tasks import TASKS

TASK = "dllm_addition_small"


class CurrentStderr:
    """Writes to whatever ``sys.stderr`` is now (pytest gives each test its own)."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


@pytest.fixture(autouse=True)
def lm_eval_logs_to_this_tests_stderr():
    """lm-eval's log handler would keep the stderr of its first run: another test's closed capture."""
    for handler in logging.getLogger("lm_eval").handlers:
        if type(handler) is logging.StreamHandler:  # not pytest's own capture handlers
            handler.stream = CurrentStderr()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    """A tiny random byte-level Llama as a Lightning checkpoint and as its HF export."""
    folder = tmp_path_factory.mktemp("tiny")
    torch.manual_seed(0)
    config = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 512,
              "tie_word_embeddings": False}  # fmt: skip
    module = DLLMModule(model_config=config, tokenizer="byte")
    head = module.model.lm_head.weight
    with torch.no_grad():
        printable = torch.zeros(head.size(0), dtype=torch.bool)
        printable[3 + 32 : 3 + 127] = True  # byte b is id b + 3
        head[~printable] = 0
        head[module.tokenizer.eos_token_id] = 1.01 * head[3 + ord("2")]
    ckpt = folder / "model.ckpt"
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams),
                "pytorch-lightning_version": L.__version__}, ckpt)  # fmt: skip
    module.save_hf(str(folder / "hf"))
    return {"ckpt": ckpt, "hf": folder / "hf"}


def evaluate(out: Path, model: str, model_args: str, *flags: str) -> tuple[dict, list[dict]]:
    """Run ``python -m dllm.evaluation`` in-process; the results file and the logged samples."""
    argv = ["--model", model, "--model_args", model_args, "--tasks", TASK, "--device", "cpu",
            "--apply_chat_template", "--output_path", str(out), "--log_samples", *flags]  # fmt: skip
    assert main(argv) == 0
    results = json.loads(next(out.rglob("results_*.json")).read_text())
    samples = [json.loads(line) for line in next(out.rglob(f"samples_{TASK}_*.jsonl")).read_text().splitlines()]
    return results, sorted(samples, key=lambda s: s["doc_id"])


def test_jacobi_gives_hf_responses_and_scores(tiny, tmp_path, capsys):
    budget = ["--limit", "6", "--gen_kwargs", "max_gen_toks=40"]
    hf, hf_samples = evaluate(tmp_path / "hf", "hf", f"pretrained={tiny['hf']},dtype=float64,add_bos_token=False",
                              *budget)  # fmt: skip
    dllm, dllm_samples = evaluate(
        tmp_path / "dllm", "dllm", f"ckpt_path={tiny['ckpt']},dtype=float64,mode=jacobi,add_eos_length=3",
        "--batch_size", "4", *budget,
    )  # fmt: skip
    responses = [s["resps"] for s in hf_samples]
    assert [s["resps"] for s in dllm_samples] == responses
    lengths = {len(r[0][0]) for r in responses}
    assert len(lengths) > 1 and max(lengths) == 40  # some stop at EOS, some use the whole budget
    score = hf["results"][TASK]["exact_match,none"]
    assert dllm["results"][TASK]["exact_match,none"] == score
    assert [s["exact_match"] for s in dllm_samples] == [s["exact_match"] for s in hf_samples]
    # the same tokens counted; plain decoding takes a forward per token
    hf_metrics, dllm_metrics = hf["results"][TASK], dllm["results"][TASK]
    assert hf_metrics["generated_tokens,none"] == dllm_metrics["generated_tokens,none"]
    assert hf_metrics["tokens_per_forward,none"] == 1.0
    assert dllm_metrics["forwards,none"] < hf_metrics["forwards,none"]  # batched, and drafts
    assert "tokens_per_forward" in capsys.readouterr().out  # lm-eval's printed table


def test_refine_runs_and_reports_tokens_per_forward(tiny, tmp_path, capsys):
    results, samples = evaluate(
        tmp_path, "dllm", f"pretrained={tiny['hf']},mode=refine,add_eos_length=3,refine_iter=2",
        "--limit", "3", "--batch_size", "2", "--gen_kwargs", "max_gen_toks=24",
    )  # fmt: skip
    metrics = results["results"][TASK]
    assert len(samples) == 3
    assert metrics["tokens_per_forward,none"] > 1.5  # 4-token blocks in at most 2 forwards
    assert metrics["generated_tokens,none"] == sum(len(s["resps"][0][0]) + 1 for s in samples) - sum(
        len(s["resps"][0][0]) == 24 for s in samples
    )  # a character per token, plus the EOS of those that stopped early
    table = capsys.readouterr().out
    assert "tokens_per_forward" in table and "tokens_per_s" in table and "forwards" in table


def generate(lm, contexts: list[str], until: list[str], max_gen_toks: int = 32, do_sample: bool = False) -> list[str]:
    kwargs = {"until": until, "max_gen_toks": max_gen_toks, "do_sample": do_sample}
    requests = [
        Instance("generate_until", {}, (text, dict(kwargs)), idx=i, metadata=("stops", i, 1))
        for i, text in enumerate(contexts)
    ]
    METER.reset()
    return lm.generate_until(requests, disable_tqdm=True)


@pytest.fixture(scope="module")
def lms(tiny):
    args = {"dtype": "float64", "device": "cpu", "add_bos_token": False, "batch_size": 3}
    return {
        "hf": HFLM(pretrained=str(tiny["hf"]), **args),
        # fixed drafts: adaptive ones follow measured timings, and the forward counts below with them
        "jacobi": DLLM(pretrained=str(tiny["hf"]), mode="jacobi", add_eos_length=3, adaptive_draft=False, **args),
        "refine": DLLM(pretrained=str(tiny["hf"]), mode="refine", add_eos_length=3, refine_iter=1, **args),
    }


CONTEXTS = ["Q: 12+34=\nA: ", "Q: 9+9=\nA: ", "Q: 70+5=\nA: "]


def first_at(text: str, start: int, length: int) -> str:
    """A stop string that first occurs at ``start`` in ``text``."""
    for begin in range(start, len(text) - length):
        if text.find(text[begin : begin + length]) == begin:
            return text[begin : begin + length]
    raise AssertionError(f"no new {length}-character string from {start} in {text!r}")


@pytest.mark.parametrize("mode", ["jacobi", "refine"])
def test_stop_strings_cut_where_hf_cuts(lms, mode):
    """Stop strings inside a 4-token block (characters 5-6), across two blocks (6-9) and late (30-33) cut
    the text before them, as lm-eval's hf does; the engine stops the row there (in one generation, no
    re-run prefixes), and only the tokens up to the stop count as generated and in tokens per forward."""
    lm = lms[mode]
    full = generate(lm, CONTEXTS, [], max_gen_toks=80)
    row = max(range(len(full)), key=lambda i: len(full[i]))
    text = full[row]
    assert len(text) == 80, text
    generate(lm, [CONTEXTS[row]], [], max_gen_toks=80)
    uncut = METER.tasks["stops"]
    for start, length in [(5, 2), (6, 4), (30, 4)]:
        stop = first_at(text, start, length)
        cut = text[: text.find(stop)]
        got = generate(lm, CONTEXTS, [stop, "never"], max_gen_toks=80)
        assert got[row] == cut and len(cut) < len(text)
        assert got == [t.split(stop)[0] for t in full]
        if mode == "jacobi":  # exactly lm-eval's hf, which stops generating there
            assert got == generate(lms["hf"], CONTEXTS, [stop, "never"], max_gen_toks=80)
        generate(lm, [CONTEXTS[row]], [stop], max_gen_toks=80)
        counts = METER.tasks["stops"]
        assert counts.generated_tokens == text.find(stop) + length  # hf stops once the stop string is out
        assert counts.forwards < uncut.forwards and counts.row_forwards < uncut.row_forwards
        # one generation: the forwards are those of the uncut run up to the stop (none re-runs a prefix)
        assert counts.forwards == forwards_to(lm, CONTEXTS[row], counts.generated_tokens, 80)


def forwards_to(lm, context: str, tokens: int, max_new: int) -> int:
    """The forwards an uninterrupted engine run of the prompt alone takes to commit ``tokens`` tokens."""
    from dllm.generation import iterative_generate

    ids = torch.tensor([lm.tok_encode(context)])
    steps = []  # the tokens committed after each forward, read by a criterion that never stops
    settings = {key: lm.generation[key] for key in ("mode", "add_eos_length", "refine_iter", "adaptive_draft")}
    iterative_generate(
        lm.model, ids, eos_token_id=lm.stop_ids, max_new_tokens=max_new,
        stop_criterion=lambda committed, start: steps.append(len(committed)), **settings,
    )  # fmt: skip
    return next(i for i, committed in enumerate(steps, 1) if committed >= tokens)


def test_sampling_is_seeded_per_prompt_across_batches(tiny):
    """temperature from --model_args samples; a prompt's sample depends on the seed, not on its batch,
    also with a stop string and past 32 tokens (where the adapter's second round of re-runs once began)."""
    args = {"dtype": "float64", "device": "cpu", "batch_size": 3, "mode": "jacobi", "add_eos_length": 3}
    samples = {}
    for seed in range(1, 6):  # samples stop at EOS often: find seeds whose sample outlives the first round
        lm = DLLM(pretrained=str(tiny["hf"]), temperature=0.7, seed=seed, **args)
        samples[seed] = generate(lm, CONTEXTS, ["never"], max_gen_toks=60)
        if max(len(text) for text in samples[seed]) > 32:
            break
    assert max(len(text) for text in samples[seed]) > 32
    assert [generate(lm, [context], ["never"], max_gen_toks=60)[0] for context in CONTEXTS] == samples[seed]
    greedy = generate(DLLM(pretrained=str(tiny["hf"]), **args), CONTEXTS, ["never"], max_gen_toks=60)
    other = samples.get(seed - 1) or generate(
        DLLM(pretrained=str(tiny["hf"]), temperature=0.7, seed=seed + 1, **args), CONTEXTS, ["never"], 60
    )
    assert samples[seed] != greedy and samples[seed] != other


def test_bad_model_args_key_is_one_error_line(tiny, capsys):
    status = main(["--model", "dllm", "--model_args", f"pretrained={tiny['hf']},refine_iters=3", "--tasks", TASK,
                   "--device", "cpu", "--limit", "1"])  # fmt: skip
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert status == 2 and len(errors) == 1 and "Traceback" not in err
    assert errors[0].startswith("error: --model_args refine_iters: not an argument of --model dllm")


@pytest.mark.parametrize(
    "model_args, message",
    [
        ("mode=greedy", "--model_args mode='greedy': must be 'refine' or 'jacobi'"),
        ("add_eos_length=x", "--model_args add_eos_length='x': expected int"),
        ("ckpt_path=/nonexistent.ckpt", "--model_args ckpt_path=/nonexistent.ckpt: no such file"),
    ],
)
def test_bad_model_args_values(tiny, model_args, message):
    args = dict(kv.split("=") for kv in model_args.split(","))
    if "ckpt_path" not in args:
        args["pretrained"] = str(tiny["hf"])
    with pytest.raises(ValueError, match="^" + message.replace("(", r"\(").replace(")", r"\)")):
        DLLM(device="cpu", **args)


def test_shipped_tasks_are_the_generated_test_splits():
    for task in TASKS:
        shipped = (TASKS_DIR / "data" / f"{task}.jsonl").read_text().splitlines()
        assert [json.loads(line) for line in shipped] == split_records(task)
        assert (TASKS_DIR / f"{lm_eval_name(task)}.yaml").is_file()


@pytest.mark.parametrize("mode", ["jacobi", "refine"])
def test_an_empty_stop_string_stops_after_one_token_as_hf_does(lms, mode):
    """``""`` is in every text, so hf's stop criterion fires after the first token; it used to be skipped."""
    for until in ([""], ["never", ""]):
        got = generate(lms[mode], CONTEXTS, until, max_gen_toks=20)
        assert METER.tasks["stops"].generated_tokens == len(CONTEXTS)  # one token each, as hf generates
        hf = generate(lms["hf"], CONTEXTS, until, max_gen_toks=20)
        if mode == "jacobi":
            assert got == hf
        assert all(len(text) <= 1 for text in got)


def engine_sample(lm, context: str, seed: int, mode: str, n: int, max_new: int) -> list[int]:
    """The reference: the tokens of one ``iterative_generate`` call for the prompt alone, to EOS or the budget."""
    from dllm.generation import iterative_generate

    ids = torch.tensor([lm.tok_encode(context)])
    out = iterative_generate(
        lm.model, ids, eos_token_id=lm.stop_ids, add_eos_length=n, refine_iter=2, mode=mode, max_new_tokens=max_new,
        temperature=0.7, generator=torch.Generator().manual_seed(seed), return_dict=True,
    )  # fmt: skip
    return out.sequences[0, ids.size(1) : ids.size(1) + int(out.new_tokens[0])].tolist()


def cut(lm, tokens: list[int], until: list[str]) -> str:
    """The text lm-eval scores: decoded, then cut before each stop string."""
    text = lm.tok_decode(tokens)
    for stop in until:
        text = text.split(stop)[0]
    return text


@pytest.mark.parametrize("mode", ["jacobi", "refine"])
def test_a_sample_is_the_engines_whatever_the_block_size_and_stop_strings(tiny, mode):
    """The adapter's old stop-string rounds (32 tokens, rounded to whole blocks, then twice as many) once moved
    each row's sampling key on: a sample depended on add_eos_length and on whether a stop string existed.
    It is the engine's own sample for that prompt and seed, cut where the stop strings cut."""
    args = {"dtype": "float64", "device": "cpu", "batch_size": 3, "mode": mode, "refine_iter": 2, "temperature": 0.7}
    lm = DLLM(pretrained=str(tiny["hf"]), add_eos_length=3, **args)
    for seed in range(1, 12):  # samples stop at EOS often: find a seed whose sample outlives the first round
        tokens = [engine_sample(lm, context, seed, mode, 3, 60) for context in CONTEXTS]
        if max(len(t) for t in tokens) >= 50:
            break
    longest = max(range(len(CONTEXTS)), key=lambda i: len(tokens[i]))
    text = lm.tok_decode(tokens[longest])
    stop = first_at(text, len(lm.tok_decode(tokens[longest][:40])), 3)  # met late (past 35 tokens)
    for n in (0, 3, 4, 6):
        lm = DLLM(pretrained=str(tiny["hf"]), seed=seed, add_eos_length=n, **args)
        reference = [engine_sample(lm, context, seed, mode, n, 60) for context in CONTEXTS]
        if mode == "jacobi":  # lossless: the same sample at every block size
            assert reference == tokens
        for until in ([], ["never"], [stop], [stop, "never"]):
            expected = [cut(lm, t, until) for t in reference]
            assert generate(lm, CONTEXTS, until, max_gen_toks=60, do_sample=True) == expected, (n, until)

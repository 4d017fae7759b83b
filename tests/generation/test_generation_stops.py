"""Stop strings inside the engine (``dllm.generation.stop_strings``): rows end exactly where HF's
``generate(stop_strings=..., tokenizer=...)`` ends them, token for token (float64, greedy).

The tokenizer is a byte-level BPE built in memory over the tiny models' 40 ids, with tokens of one to five
characters ("st", "op", "opera", ...), so a stop string can span tokens, end inside a token, or be
completed by a token that runs past its end, as HF's criterion allows.
"""

import pytest
import torch
from conftest import EOS, VOCAB
from generation_helpers import generated_rows, prompts
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, StopStringCriteria

from dllm import iterative_generate
from dllm.generation import engine
from dllm.generation.stepper import Stepper

PIECES = ["a", "b", "c", "d", "e", "f", "o", "p", "s", "t", "Ġ", "Ċ", "st", "op", "sto", "pp", "ed", "top", "opera",
          "ab", "ba", "cd", "Ġs", "Ġt", "ĠĠ", "ĊĊ", "Ċa", "fe", "ef", "ca", "pe", "sa", "Ġop", "dd", "tt", "os", "ts",
          "so"]  # fmt: skip


@pytest.fixture(scope="module")
def tokenizer():
    vocab = {"<pad>": 0, "</s>": EOS, **{piece: i + 2 for i, piece in enumerate(PIECES)}}
    assert len(vocab) == VOCAB
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=None, ignore_merges=True))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>", pad_token="<pad>")


def hf_rows(model, ids, mask, tokenizer, stops, max_new):
    """HF's greedy generate with stop strings: each row's tokens up to (and with) the one that stopped it,
    and why it stopped (``"eos"``: a stop id or a stop string, as dllm says it; ``"length"``: the budget)."""
    out = model.generate(
        input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=max_new, eos_token_id=EOS,
        pad_token_id=0, stop_strings=stops, tokenizer=tokenizer,
    )  # fmt: skip
    criterion = StopStringCriteria(tokenizer, stops)
    rows, reasons = [], []
    for i, row in enumerate(out[:, ids.size(1) :].tolist()):
        prompt = ids[i][mask[i].bool()].tolist()
        # HF pads a row after it stops: its own tokens end at its first stop id or stop string
        ends = (
            e for e in range(1, len(row) + 1) if row[e - 1] == EOS or criterion(torch.tensor([prompt + row[:e]]), None)
        )
        end = next(ends, None)
        rows.append(row[:end] if end else row)
        reasons.append("eos" if end else "length")
    return rows, reasons


def first_new(text: str, start: int, length: int) -> str:
    """A string of ``length`` characters that first occurs at ``start`` or later in ``text``."""
    for begin in range(start, len(text) - length + 1):
        piece = text[begin : begin + length]
        if text.find(piece) == begin and piece.strip():
            return piece
    raise AssertionError(f"no new {length}-character string from {start} in {text!r}")


def free_run(model, ids, mask, n, max_new):
    out = iterative_generate(
        model, ids, mask, eos_token_id=EOS, mode="jacobi", add_eos_length=n, adaptive_draft=False,
        max_new_tokens=max_new, return_dict=True,
    )  # fmt: skip
    return generated_rows(out, ids.size(1))


@pytest.mark.parametrize("lengths", [[6], [5, 9, 3, 7]])
@pytest.mark.parametrize("n", [0, 1, 3, 6])
def test_jacobi_stops_where_hf_generate_stops(models, tokenizer, n, lengths):
    """Several N and batch sizes; stop strings taken from the rows' own texts at different depths, so rows
    stop at different steps (and some not at all)."""
    model, max_new = models["llama"], 40
    ids, mask = prompts(lengths, seed=1)
    free = free_run(model, ids, mask, n, max_new)
    texts = [tokenizer.decode(tokens) for tokens in free]
    longest = max(texts, key=len)
    cut_by_strings = set()
    for stops in ([first_new(longest, 3, 2)], [first_new(longest, 12, 3), first_new(texts[0], 20, 2)], ["zz", "ab"]):
        expected, reasons = hf_rows(model, ids, mask, tokenizer, stops, max_new)
        out = iterative_generate(
            model, ids, mask, eos_token_id=EOS, mode="jacobi", add_eos_length=n, adaptive_draft=False,
            max_new_tokens=max_new, stop_strings=stops, tokenizer=tokenizer, return_dict=True,
        )  # fmt: skip
        got = generated_rows(out, ids.size(1))
        assert got == expected and out.finish_reason == reasons, (stops, got, expected)
        cut_by_strings |= {len(tokens) for tokens, whole in zip(got, free) if len(tokens) < len(whole)}
    assert len(cut_by_strings) >= 2  # rows stopped by a string, at different steps


def commits_of(model, ids, n, max_new):
    """One row's commits: (tokens before, tokens after) of every step, read by a criterion that never stops."""
    steps = []
    iterative_generate(
        model, ids, eos_token_id=EOS, mode="jacobi", add_eos_length=n, adaptive_draft=False, max_new_tokens=max_new,
        stop_criterion=lambda tokens, start: steps.append((start, len(tokens))),
    )  # fmt: skip
    return steps


def test_a_stop_string_completed_inside_a_commit_drops_the_rest_of_it(models, tokenizer):
    """A stop string spanning tokens, completed by a token in the middle of a multi-token commit: the row keeps
    the tokens up to that one (HF's), not the whole commit."""
    model, n, max_new = models["llama"], 6, 40
    ids, mask = prompts([9], seed=1)
    tokens = free_run(model, ids, mask, n, max_new)[0]
    inside = [(s, e) for s, e in commits_of(model, ids, n, max_new) if e - s >= 3]
    assert inside, "no multi-token commit to stop inside"
    start, end = inside[0]
    cut = start + 1  # the second token of the commit completes the stop string: its last character and more
    before = tokenizer.decode(tokens[:cut])
    stop = next(before[-k:] for k in range(3, len(before)) if before.find(before[-k:]) == len(before) - k)
    assert len(tokenizer.decode(tokens[cut - 1])) < len(stop)  # spans tokens
    expected, _ = hf_rows(model, ids, mask, tokenizer, [stop], max_new)
    got = iterative_generate(
        model, ids, eos_token_id=EOS, mode="jacobi", add_eos_length=n, adaptive_draft=False, max_new_tokens=max_new,
        stop_strings=stop, tokenizer=tokenizer, return_dict=True,
    )  # fmt: skip
    assert generated_rows(got, ids.size(1)) == expected == [tokens[:cut]] and cut < end
    assert got.finish_reason == ["eos"] and int(got.new_tokens[0]) == cut


def test_the_prompts_tail_counts_as_in_hf(models, tokenizer):
    """HF's criterion reads the whole sequence: a stop string spanning the prompt's end and the first token
    stops the row there, though the response text alone does not hold it."""
    model = models["llama"]
    for seed in range(20):
        ids, mask = prompts([6], seed=seed)
        first = free_run(model, ids, mask, 3, 1)[0]
        stop = tokenizer.decode(ids[0, -1:])[-1] + tokenizer.decode(first)[0]
        if stop not in tokenizer.decode(free_run(model, ids, mask, 3, 30)[0]):
            break
    else:
        pytest.fail("every prompt's answer holds its own prompt-spanning string")
    expected, reasons = hf_rows(model, ids, mask, tokenizer, [stop], 30)
    out = iterative_generate(
        model, ids, mask, eos_token_id=EOS, mode="jacobi", add_eos_length=3, max_new_tokens=30, stop_strings=stop,
        tokenizer=tokenizer, return_dict=True,
    )  # fmt: skip
    assert generated_rows(out, ids.size(1)) == expected == [first] and out.finish_reason == reasons == ["eos"]


def test_row_by_row_batches_stop_each_row_on_its_own_prompt(models, tokenizer, monkeypatch):
    """Where a batch runs one row at a time (attention without 4-D masks), each row's stop strings still read
    its own prompt: the rows are those of the whole batch."""
    model = models["llama"]
    ids, mask = prompts([5, 9, 3, 7], seed=1)
    stops = [first_new(tokenizer.decode(max(free_run(model, ids, mask, 3, 40), key=len)), 6, 2)]
    settings = dict(eos_token_id=EOS, mode="jacobi", add_eos_length=3, max_new_tokens=40, return_dict=True)
    batched = iterative_generate(model, ids, mask, stop_strings=stops, tokenizer=tokenizer, **settings)
    monkeypatch.setattr(engine, "attention_layout", lambda model: ("one-row-uncached", None, False))
    with pytest.warns(UserWarning, match="one row at a time"):
        by_row = iterative_generate(model, ids, mask, stop_strings=stops, tokenizer=tokenizer, **settings)
    expected, reasons = hf_rows(model, ids, mask, tokenizer, stops, 40)
    assert generated_rows(by_row, ids.size(1)) == generated_rows(batched, ids.size(1)) == expected
    assert by_row.finish_reason == batched.finish_reason == reasons
    assert any(len(tokens) < 40 and tokens[-1] != EOS for tokens in expected)  # a stop string cut a row


def test_refine_stops_at_the_first_stop_string_of_its_own_text(models, tokenizer):
    """Refine is not greedy text, but a stop string ends its rows the same way: its text without stop strings,
    cut at the first token that completes one (HF's criterion on every prefix)."""
    model, max_new = models["llama"], 30
    ids, mask = prompts([5, 9, 3, 7], seed=2)
    settings = dict(eos_token_id=EOS, mode="refine", add_eos_length=4, refine_iter=2, max_new_tokens=max_new)
    free = generated_rows(iterative_generate(model, ids, mask, return_dict=True, **settings), ids.size(1))
    stop = first_new(tokenizer.decode(max(free, key=len)), 6, 2)
    criterion = StopStringCriteria(tokenizer, [stop])
    expected = []
    for i, tokens in enumerate(free):
        prompt = ids[i][mask[i].bool()].tolist()
        end = next((e for e in range(1, len(tokens) + 1) if criterion(torch.tensor([prompt + tokens[:e]]), None)), None)
        expected.append(tokens[:end] if end else tokens)
    out = iterative_generate(model, ids, mask, return_dict=True, stop_strings=[stop], tokenizer=tokenizer, **settings)
    assert generated_rows(out, ids.size(1)) == expected and expected != free


def test_a_callers_criterion_is_checked_after_every_step(models):
    """``stop_criterion`` ends each row where it says (here: after 11 tokens), also inside a commit."""
    model = models["llama"]
    ids, mask = prompts([5, 9, 3], seed=1)
    free = free_run(model, ids, mask, 3, 30)
    out = iterative_generate(
        model, ids, mask, eos_token_id=EOS, mode="jacobi", add_eos_length=3, adaptive_draft=False, max_new_tokens=30,
        stop_criterion=lambda tokens, start: 11 if start < 11 <= len(tokens) else None, return_dict=True,
    )  # fmt: skip
    assert generated_rows(out, ids.size(1)) == [t[:11] for t in free]
    assert out.finish_reason == ["eos" if len(t) > 11 or t[-1] == EOS else "length" for t in free]
    assert max(len(t) for t in free) > 11


def test_the_stepper_stops_a_row_where_iterative_generate_does(models, tokenizer):
    model = models["llama"]
    ids, mask = prompts([5, 9], seed=1)
    texts = [row[m.bool()].tolist() for row, m in zip(ids, mask)]
    free = free_run(model, ids, mask, 4, 30)
    stop = first_new(tokenizer.decode(free[1]), 8, 2)
    stepper = Stepper(model, [EOS], add_eos_length=4, adaptive_draft=False, max_length=60, tokenizer=tokenizer)
    stepper.admit("a", texts[0], 30, stop_strings=[stop])
    stepper.admit("b", texts[1], 30, stop_strings=[stop])
    got, reasons = {"a": [], "b": []}, {}
    while not stepper.idle:
        for event in stepper.step():
            got[event.id] += event.tokens
            if event.finish_reason:
                reasons[event.id] = event.finish_reason
    for key, prompt in zip("ab", texts):
        alone = iterative_generate(
            model, torch.tensor([prompt]), eos_token_id=EOS, mode="jacobi", add_eos_length=4, max_new_tokens=30,
            stop_strings=[stop], tokenizer=tokenizer, return_dict=True,
        )  # fmt: skip
        assert got[key] == generated_rows(alone, len(prompt))[0] and reasons[key] == alone.finish_reason[0]
    assert len(got["b"]) < len(free[1])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(stop_strings=[""]), r"stop_strings must be a string or a list of non-empty strings, got \[''\]"),
        (dict(stop_strings=["ab", 3]), "stop_strings must be a string or a list of non-empty strings"),
        (dict(stop_strings="ab"), r"stop_strings=\['ab'\] needs tokenizer="),
        (dict(stop_criterion="ab"), "stop_criterion must be callable"),
        (dict(stop_criterion=lambda tokens, start: 0), r"stop_criterion returned 0; it must be None or a count"),
    ],
)
def test_bad_stop_arguments_name_the_argument(models, kwargs, message):
    ids, _ = prompts([4])
    with pytest.raises(ValueError, match=message):
        iterative_generate(models["llama"], ids, eos_token_id=EOS, mode="jacobi", max_new_tokens=5, **kwargs)


def test_a_stop_string_no_token_can_end_names_the_argument(models, tokenizer):
    ids, _ = prompts([4])
    with pytest.raises(ValueError, match=r"stop_strings=\['x→'\]: Stop string preprocessing was unable"):
        iterative_generate(models["llama"], ids, eos_token_id=EOS, stop_strings=["x→"], tokenizer=tokenizer)

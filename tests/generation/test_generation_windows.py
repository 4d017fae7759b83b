"""Sliding-window and hybrid models: every row's window is what it would be alone, cached or not.

Windows of 4 positions against 20 generated tokens, a batch of 3 rows with left
padding, and jacobi holes (rows confirming different counts in one forward),
some forced deliberately. The truth is HF greedy ``generate`` on each row alone
(no padding, no holes), in float64, token for token.
"""

import pytest
import torch
from conftest import EOS, VOCAB, rope_kwargs
from generation_helpers import generated_rows, naive_refine, prompts
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

import dllm.generation.engine as generation
import dllm.generation.jacobi as draft_jacobi
from dllm import iterative_generate
from dllm.attention import attention_layout

WINDOW = 4
LENGTHS = [6, 2, 11]
NEW = 20
WINDOWED = ["mistral", "qwen2-window", "gemma2", "gemma3"]


def windowed_model(arch: str) -> torch.nn.Module:
    """A tiny float64 model whose (some) layers attend to the last ``WINDOW`` positions only."""
    torch.manual_seed(0)
    kw = {**rope_kwargs(), "num_hidden_layers": 4}
    if arch == "mistral":  # every layer windowed
        model = MistralForCausalLM(MistralConfig(sliding_window=WINDOW, **kw))
    elif arch == "qwen2-window":  # layers 2 and 3 windowed
        model = Qwen2ForCausalLM(Qwen2Config(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=2, **kw))
    elif arch == "gemma2":  # alternating sliding / full, eager attention, soft-capping
        model = Gemma2ForCausalLM(Gemma2Config(sliding_window=WINDOW, head_dim=8, **kw))
    elif arch == "gemma3":  # sliding, full, sliding, full (pattern 2), sdpa
        model = Gemma3ForCausalLM(Gemma3TextConfig(sliding_window=WINDOW, head_dim=8, sliding_window_pattern=2, **kw))
    else:
        raise ValueError(arch)
    return model.double().eval()


@pytest.fixture(scope="module")
def windowed() -> dict:
    return {arch: windowed_model(arch) for arch in WINDOWED}


_HF: dict = {}


def hf_alone(model, ids, lengths, new=NEW) -> list[list[int]]:
    """HF greedy on each row alone: no padding, no holes, the model's own masks (memoised per model)."""
    key = (id(model), new)
    if key not in _HF:
        width = ids.size(1)
        _HF[key] = [
            model.generate(
                ids[row : row + 1, width - length :], do_sample=False, max_new_tokens=new, eos_token_id=EOS,
                pad_token_id=0,
            )[0, length:].tolist()
            for row, length in enumerate(lengths)
        ]  # fmt: skip
    return _HF[key]


def test_the_models_really_are_windowed(windowed):
    kinds = {arch: attention_layout(model) for arch, model in windowed.items()}
    assert kinds == {
        "mistral": ("window", WINDOW, False),
        "qwen2-window": ("window", WINDOW, True),
        "gemma2": ("window", WINDOW, True),
        "gemma3": ("window", WINDOW, True),
    }
    assert windowed["gemma2"].config._attn_implementation == "eager"


@pytest.mark.parametrize("arch", WINDOWED)
@pytest.mark.parametrize("use_cache", [True, False])
@pytest.mark.parametrize("n,adaptive", [(5, True), (5, False), (2, False)])
def test_jacobi_on_windowed_models_equals_hf_greedy_alone(windowed, arch, use_cache, n, adaptive):
    model = windowed[arch]
    ids, mask = prompts(LENGTHS)
    out = iterative_generate(
        model, ids, mask, eos_token_id=EOS, pad_token_id=0, add_eos_length=n, mode="jacobi", max_new_tokens=NEW,
        use_cache=use_cache, adaptive_draft=adaptive, return_dict=True,
    )  # fmt: skip
    assert generated_rows(out, ids.size(1)) == hf_alone(model, ids, LENGTHS)


@pytest.mark.parametrize("arch", WINDOWED)
@pytest.mark.parametrize("n,r", [(0, 1), (3, 2), (6, 3)])
def test_refine_on_windowed_models_equals_the_reference(windowed, arch, n, r):
    model = windowed[arch]
    ids, mask = prompts(LENGTHS)
    kwargs = dict(eos_token_id=EOS, add_eos_length=n, refine_iter=r, max_new_tokens=NEW, return_dict=True)
    cached = iterative_generate(model, ids, mask, **kwargs)
    uncached = iterative_generate(model, ids, mask, use_cache=False, **kwargs)
    assert torch.equal(cached.sequences, uncached.sequences)
    width = ids.size(1)
    for row, length in enumerate(LENGTHS):
        expected, _ = naive_refine(model, ids[row, width - length :].tolist(), [EOS], n, r, NEW, 8192)
        assert generated_rows(cached, width)[row] == expected


def oracle_drafts(truth: list[list[int]], correct: list[int]):
    """A draft source that knows each row's greedy continuation and gets ``correct[row]`` tokens right.

    Rows then confirm different counts in the same forward: holes, by design.
    """

    def next_drafts(run, pending, predicted, tokens, accepted, k):
        rows = []
        for row in run.batch.rows:
            done = len(run.generated[row])
            future = truth[row][done : done + pending.size(1)]  # the draft guesses the next tokens
            guess = future[: correct[row]] + [(t + 1) % VOCAB or 2 for t in future[correct[row] :]]
            guess += [run.placeholder] * (pending.size(1) - len(guess))
            rows.append(guess)
        return torch.tensor(rows, dtype=pending.dtype), [pending.size(1)] * len(rows)

    return next_drafts


class CommitSpy:
    """Records the confirmed counts of every jacobi forward."""

    def __init__(self, monkeypatch):
        self.counts: list[list[int]] = []
        original = generation.Batch.commit_draft

        def spy(batch, count, accepted=None):
            self.counts.append(accepted.tolist() if accepted is not None else [count] * len(batch.rows))
            return original(batch, count, accepted)

        monkeypatch.setattr(generation.Batch, "commit_draft", spy)


@pytest.mark.parametrize("arch", WINDOWED)
@pytest.mark.parametrize("use_cache", [True, False])
def test_forced_holes_inside_the_window_keep_every_row_exact(windowed, arch, use_cache, monkeypatch):
    """Row 0's drafts are right for 5 tokens, row 1's for 2, row 2's never: holes of 3 and 5 columns
    land inside a window of 4 at every forward. Each row still equals HF greedy alone."""
    model = windowed[arch]
    ids, mask = prompts(LENGTHS)
    truth = hf_alone(model, ids, LENGTHS, NEW + 8)
    monkeypatch.setattr(draft_jacobi, "_next_drafts", oracle_drafts(truth, [5, 2, 0]))
    spy = CommitSpy(monkeypatch)
    out = iterative_generate(
        model, ids, mask, eos_token_id=EOS, pad_token_id=0, add_eos_length=6, mode="jacobi", max_new_tokens=NEW,
        use_cache=use_cache, adaptive_draft=False, draft_sources="none", return_dict=True,
    )  # fmt: skip
    assert generated_rows(out, ids.size(1)) == [t[:NEW] for t in truth]
    assert [5, 2, 0] in spy.counts  # the holes really happened


def test_forced_holes_break_a_window_counted_in_columns(windowed, monkeypatch):
    """The same forced holes with the window measured in columns (the 2-D mask path) go wrong:
    the test above would catch a regression to it."""
    model = windowed["mistral"]
    ids, mask = prompts(LENGTHS)
    truth = hf_alone(model, ids, LENGTHS, NEW + 8)
    monkeypatch.setattr(draft_jacobi, "_next_drafts", oracle_drafts(truth, [5, 2, 0]))
    monkeypatch.setattr(generation, "attention_layout", lambda model: ("plain", None, False))
    out = iterative_generate(
        model, ids, mask, eos_token_id=EOS, pad_token_id=0, add_eos_length=6, mode="jacobi", max_new_tokens=NEW,
        use_cache=False, adaptive_draft=False, draft_sources="none", return_dict=True,
    )  # fmt: skip
    assert generated_rows(out, ids.size(1)) != [t[:NEW] for t in truth]


@pytest.mark.parametrize("kind,use_cache", [("one-row", True), ("one-row-uncached", False)])
def test_one_row_fallback_warns_and_stays_exact(windowed, kind, use_cache, monkeypatch):
    """Where 4-D masks are refused (e.g. flash attention) the batch runs row by row, with a warning."""
    model = windowed["gemma3"]
    monkeypatch.setattr(generation, "attention_layout", lambda model: (kind, WINDOW, False))
    ids, mask = prompts(LENGTHS)
    with pytest.warns(UserWarning, match="one row at a time"):
        out = iterative_generate(
            model, ids, mask, eos_token_id=EOS, pad_token_id=0, add_eos_length=4, mode="jacobi", max_new_tokens=NEW,
            use_cache=use_cache, return_dict=True,
        )  # fmt: skip
    assert generated_rows(out, ids.size(1)) == hf_alone(model, ids, LENGTHS)
    assert out.num_forwards == int(out.forwards.sum())  # every forward had one row

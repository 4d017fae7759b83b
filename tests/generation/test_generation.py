"""Pin the generation engine's contract (docs/method.md) on tiny float64 models.

Exactness is the point: every comparison is token for token.
"""

import pytest
import torch
from conftest import ARCHS, EOS
from generation_helpers import frequent_token, generated_rows, hf_greedy, naive_refine, prompts

from dllm import iterative_generate
from dllm.generation import filter_logits

# --- equal to plain greedy decoding -----------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_refine_single_token_blocks_equal_hf_generate(models, arch):
    model = models[arch]
    ids, mask = prompts([5, 9, 3])
    expected = hf_greedy(model, ids, mask, 20)
    got = iterative_generate(
        model, ids, mask, eos_token_id=EOS, pad_token_id=0, add_eos_length=0, refine_iter=1, max_new_tokens=20
    )
    assert torch.equal(got, expected)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize(
    "n,adaptive", [(0, True), (1, True), (3, True), (7, True), (16, True), (3, False), (16, False)]
)
def test_jacobi_equals_hf_generate(models, arch, n, adaptive):
    model = models[arch]
    ids, mask = prompts([6, 2, 11])
    expected = hf_greedy(model, ids, mask, 25)
    got = iterative_generate(
        model, ids, mask, eos_token_id=EOS, pad_token_id=0, add_eos_length=n, mode="jacobi", max_new_tokens=25,
        adaptive_draft=adaptive,
    )  # fmt: skip
    assert torch.equal(got, expected)


def test_jacobi_with_stops_equals_hf_generate(models):
    model = models["qwen2"]
    ids, mask = prompts([6, 2, 11, 4])
    stop = frequent_token(model, ids, mask)
    expected = hf_greedy(model, ids, mask, 30, eos=[EOS, stop])
    for n in (2, 5):
        out = iterative_generate(
            model,
            ids,
            mask,
            eos_token_id=[EOS, stop],
            pad_token_id=0,
            add_eos_length=n,
            mode="jacobi",
            max_new_tokens=30,
            return_dict=True,
        )
        assert torch.equal(out.sequences, expected)
        assert "eos" in out.finish_reason


def test_jacobi_commits_several_tokens_when_the_draft_is_right(models):
    """A model that repeats itself drafts correctly: more than one token per forward (a fixed draft: the
    adaptive one may rightly stop drafting when a longer forward costs more, which depends on the machine)."""
    model = models["qwen2"]
    ids, mask = prompts([4])
    out = iterative_generate(
        model, ids, mask, eos_token_id=EOS, add_eos_length=3, mode="jacobi", max_new_tokens=200, return_dict=True,
        adaptive_draft=False,
    )  # fmt: skip
    # greedy decoding of a tiny random model falls into a cycle; the shifted draft
    # then predicts it, so jacobi must beat one token per forward
    assert out.num_forwards < 200
    assert out.tokens_per_forward > 1.0
    assert torch.equal(out.sequences, hf_greedy(model, ids, mask, 200))


# --- refine against the original method's reference ------------------------------------


@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen3"])
@pytest.mark.parametrize("n,r,max_new", [(1, 1, 9), (3, 2, 23), (4, 3, 17), (7, 2, 30), (2, 4, 11)])
def test_refine_equals_naive_reference(models, arch, n, r, max_new):
    model = models[arch]
    ids, mask = prompts([7], seed=n + r)
    stop_ids = [EOS, frequent_token(model, ids, mask)]
    expected, reason = naive_refine(model, ids[0].tolist(), stop_ids, n, r, max_new, 8192)
    out = iterative_generate(
        model, ids, eos_token_id=stop_ids, add_eos_length=n, refine_iter=r, max_new_tokens=max_new, return_dict=True
    )
    assert generated_rows(out, ids.size(1))[0] == expected
    assert out.finish_reason == [reason]


@pytest.mark.parametrize("n,r", [(3, 2), (5, 3)])
def test_refine_batch_equals_naive_reference_with_max_length(models, n, r):
    """Rows hit max_length at different points: each one stops exactly there."""
    model = models["llama"]
    lengths = [3, 8, 12]
    ids, mask = prompts(lengths, seed=4)
    out = iterative_generate(
        model,
        ids,
        mask,
        eos_token_id=EOS,
        add_eos_length=n,
        refine_iter=r,
        max_new_tokens=40,
        max_length=25,
        return_dict=True,
    )
    for row, length in enumerate(lengths):
        prompt = ids[row, ids.size(1) - length :].tolist()
        expected, reason = naive_refine(model, prompt, [EOS], n, r, 40, 25)
        assert generated_rows(out, ids.size(1))[row] == expected
        assert out.finish_reason[row] == reason
        assert length + out.new_tokens[row] <= 25


def test_refine_early_exit_saves_forwards_without_changing_tokens(models):
    model = models["qwen2"]
    ids, _ = prompts([5])
    many = iterative_generate(
        model, ids, eos_token_id=EOS, add_eos_length=3, refine_iter=8, max_new_tokens=40, return_dict=True
    )
    expected, _ = naive_refine(model, ids[0].tolist(), [EOS], 3, 8, 40, 8192)
    assert generated_rows(many, ids.size(1))[0] == expected
    assert many.num_forwards < 10 * 8  # 10 blocks of 4 tokens, most converge early


# --- cache, batching, per-row stopping --------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("mode,n,r", [("refine", 3, 2), ("refine", 6, 1), ("jacobi", 4, 1)])
def test_cached_equals_uncached(models, arch, mode, n, r):
    """Same tokens and, with a fixed draft of the model's own guesses, the same forwards.

    Adaptive drafts follow the clock, and with text sources on, which source a row verifies follows what
    earlier rows and calls taught the model's draft memory: both change forwards, never tokens.
    """
    model = models[arch]
    ids, mask = prompts([4, 10, 7])
    kwargs = dict(eos_token_id=EOS, add_eos_length=n, refine_iter=r, max_new_tokens=27, mode=mode, return_dict=True)
    fixed = dict(adaptive_draft=False, draft_sources="none")
    cached = iterative_generate(model, ids, mask, use_cache=True, **fixed, **kwargs)
    uncached = iterative_generate(model, ids, mask, use_cache=False, **fixed, **kwargs)
    assert torch.equal(cached.sequences, uncached.sequences)
    assert cached.num_forwards == uncached.num_forwards
    if mode == "jacobi":
        for adaptive in (False, True):  # every source on
            other = iterative_generate(model, ids, mask, use_cache=False, adaptive_draft=adaptive, **kwargs)
            assert torch.equal(other.sequences, cached.sequences)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("mode,n,r", [("refine", 3, 2), ("refine", 5, 3), ("jacobi", 3, 1), ("jacobi", 6, 1)])
def test_batched_equals_one_by_one(models, arch, mode, n, r):
    model = models[arch]
    lengths = [3, 11, 6, 1]
    ids, mask = prompts(lengths, seed=1)
    stop_ids = [EOS, frequent_token(model, ids, mask)]
    kwargs = dict(
        eos_token_id=stop_ids,
        pad_token_id=0,
        add_eos_length=n,
        refine_iter=r,
        max_new_tokens=24,
        mode=mode,
        adaptive_draft=n != 3,  # jacobi N=3: a fixed draft of the model's own guesses, so the forwards match too
        draft_sources="none" if n == 3 else "all",  # (with text sources rows teach rows which source to verify)
        return_dict=True,
    )
    batched = iterative_generate(model, ids, mask, **kwargs)
    for row, length in enumerate(lengths):
        alone = iterative_generate(model, ids[row : row + 1, ids.size(1) - length :], **kwargs)
        assert generated_rows(batched, ids.size(1))[row] == generated_rows(alone, length)[0]
        assert batched.finish_reason[row] == alone.finish_reason[0]
        if mode == "refine" or n == 3:
            assert batched.forwards[row] == alone.forwards[0]


def test_a_row_that_stops_early_leaves_the_others_unchanged(models):
    model = models["llama"]
    ids, mask = prompts([5, 5, 8], seed=2)
    free = iterative_generate(model, ids, mask, eos_token_id=EOS, add_eos_length=3, max_new_tokens=20, return_dict=True)
    # make row 0 stop at its 3rd token: that token becomes an extra stop id
    stop = int(free.sequences[0, ids.size(1) + 2])
    stopped = iterative_generate(
        model,
        ids,
        mask,
        eos_token_id=[EOS, stop],
        pad_token_id=0,
        add_eos_length=3,
        max_new_tokens=20,
        return_dict=True,
    )
    assert stopped.finish_reason[0] == "eos"
    assert stopped.new_tokens[0] <= 3
    assert (stopped.sequences[0, ids.size(1) + int(stopped.new_tokens[0]) :] == 0).all()  # right-padded
    for row in (1, 2):
        tokens = generated_rows(free, ids.size(1))[row]
        cut = next((i + 1 for i, t in enumerate(tokens) if t == stop), len(tokens))
        assert generated_rows(stopped, ids.size(1))[row] == tokens[:cut]


# --- budgets, prompt EOS, stop ids ------------------------------------------


@pytest.mark.parametrize("mode", ["refine", "jacobi"])
@pytest.mark.parametrize("max_new,max_length", [(1, 100), (10, 100), (13, 16), (50, 20)])
def test_budgets_never_exceeded(models, mode, max_new, max_length):
    lengths = [2, 6, 9]
    ids, mask = prompts(lengths)
    out = iterative_generate(
        models["qwen2"],
        ids,
        mask,
        eos_token_id=EOS,
        add_eos_length=7,
        max_new_tokens=max_new,
        max_length=max_length,
        mode=mode,
        return_dict=True,
    )
    for row, length in enumerate(lengths):
        budget = min(max_new, max_length - length)
        assert out.new_tokens[row] <= budget
        if out.finish_reason[row] == "length":
            assert out.new_tokens[row] == budget
    assert out.sequences.size(1) == ids.size(1) + int(out.new_tokens.max())


@pytest.mark.parametrize("mode", ["refine", "jacobi"])
def test_eos_in_the_prompt_is_never_cut(models, mode):
    model = models["qwen2"]
    ids = torch.tensor([[5, 7, EOS, 9, EOS, 12]])
    out = iterative_generate(
        model, ids, eos_token_id=EOS, add_eos_length=3, max_new_tokens=12, mode=mode, return_dict=True
    )
    assert torch.equal(out.sequences[:, :6], ids)
    assert out.new_tokens[0] >= 1
    if mode == "jacobi":
        assert torch.equal(out.sequences, hf_greedy(model, ids, torch.ones_like(ids), 12))
    else:
        assert generated_rows(out, 6)[0] == naive_refine(model, ids[0].tolist(), [EOS], 3, 2, 12, 8192)[0]


def test_any_stop_id_stops_and_the_first_is_the_placeholder(models):
    model = models["gpt2"]
    ids, _ = prompts([6], seed=3)
    stop = frequent_token(model, ids, torch.ones_like(ids))
    a = iterative_generate(model, ids, eos_token_id=[EOS, stop], add_eos_length=4, max_new_tokens=30, return_dict=True)
    b = iterative_generate(model, ids, eos_token_id=[stop, EOS], add_eos_length=4, max_new_tokens=30, return_dict=True)
    for out, first in ((a, EOS), (b, stop)):
        expected, reason = naive_refine(model, ids[0].tolist(), [first, EOS + stop - first], 4, 2, 30, 8192)
        assert generated_rows(out, 6)[0] == expected
        assert out.finish_reason == [reason] == ["eos"]
        assert generated_rows(out, 6)[0][-1] == stop


def test_seed_call_still_works(models):
    ids, _ = prompts([5])
    out = iterative_generate(
        model=models["llama"],
        input_ids=ids,
        eos_token_id=EOS,
        pad_token_id=0,
        add_eos_length=127,
        refine_iter=2,
        max_new_tokens=40,
    )
    assert isinstance(out, torch.Tensor) and out.shape == (1, 45)


# --- sampling -----------------------------------------------------------------


@pytest.mark.parametrize("mode", ["refine", "jacobi"])
def test_same_seed_same_sample(models, mode):
    model = models["qwen2"]
    ids, mask = prompts([4, 7])

    def sample(seed):
        return iterative_generate(
            model,
            ids,
            mask,
            eos_token_id=EOS,
            add_eos_length=3,
            max_new_tokens=20,
            mode=mode,
            temperature=1.5,
            top_p=0.95,
            generator=torch.Generator().manual_seed(seed),
        )

    assert torch.equal(sample(7), sample(7))
    assert not torch.equal(sample(7), sample(8))


@pytest.mark.parametrize("mode", ["refine", "jacobi"])
def test_top_k_1_equals_greedy(models, mode):
    model = models["llama"]
    ids, mask = prompts([4, 7])
    kwargs = dict(eos_token_id=EOS, add_eos_length=3, max_new_tokens=20, mode=mode)
    sampled = iterative_generate(
        model, ids, mask, temperature=2.0, top_k=1, generator=torch.Generator().manual_seed(0), **kwargs
    )
    assert torch.equal(sampled, iterative_generate(model, ids, mask, **kwargs))


@pytest.mark.parametrize("n", [1, 4, 9])
def test_jacobi_sampling_equals_token_by_token_sampling(models, n):
    """Per-position noise: jacobi accepts exactly what plain sampling would draw."""
    model = models["mistral"]
    ids, mask = prompts([5, 3, 8])

    def sample(mode, n):
        return iterative_generate(
            model,
            ids,
            mask,
            eos_token_id=EOS,
            add_eos_length=n,
            refine_iter=1,
            max_new_tokens=30,
            mode=mode,
            temperature=0.7,
            top_k=10,
            generator=torch.Generator().manual_seed(3),
        )

    assert torch.equal(sample("jacobi", n), sample("refine", 0))


def test_filter_logits_top_k_then_top_p_keeps_at_least_one():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0]])
    assert torch.isinf(filter_logits(logits, top_k=2)).tolist() == [[False, False, True, True]]
    probs = logits.softmax(-1)[0]  # ~[0.64, 0.24, 0.09, 0.03]
    kept = ~torch.isinf(filter_logits(logits, top_p=float(probs[0] + 0.01)))
    assert kept.tolist() == [[True, True, False, False]]
    assert (~torch.isinf(filter_logits(logits, top_p=1e-6))).sum() == 1


# --- invalid input -------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,name",
    [
        (dict(add_eos_length=-1), "add_eos_length"),
        (dict(refine_iter=0), "refine_iter"),
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(max_length=5), "max_length"),
        (dict(eos_token_id=None), "eos_token_id"),
        (dict(eos_token_id=[]), "eos_token_id"),
        (dict(temperature=-0.1), "temperature"),
        (dict(temperature=1.0, top_p=0.0), "top_p"),
        (dict(temperature=1.0, top_p=1.5), "top_p"),
        (dict(temperature=1.0, top_k=0), "top_k"),
        (dict(mode="beam"), "mode"),
        (dict(input_ids=torch.ones(5, dtype=torch.long)), "input_ids"),
        (dict(input_ids=torch.ones(1, 5)), "input_ids"),
        (dict(attention_mask=torch.ones(1, 4, dtype=torch.long)), "attention_mask"),
        (dict(attention_mask=torch.zeros(1, 5, dtype=torch.long)), "row 0 is empty"),
        (dict(attention_mask=torch.tensor([[1, 1, 1, 1, 0]])), "right-padded"),
    ],
)
def test_invalid_input_raises_naming_the_argument(models, kwargs, name):
    args = dict(input_ids=torch.full((1, 5), 4), eos_token_id=EOS)
    args.update(kwargs)
    with pytest.raises(ValueError, match=name):
        iterative_generate(models["llama"], **args)


# --- the trace hook --------------------------------------------------------------


def test_trace_shows_every_refine_round_of_the_first_row(models):
    model = models["llama"]
    ids, mask = prompts([5, 8], seed=1)
    steps = []
    out = iterative_generate(
        model, ids, mask, eos_token_id=EOS, add_eos_length=3, refine_iter=3, max_new_tokens=10, return_dict=True,
        trace=steps.append,
    )  # fmt: skip
    assert len(steps) == out.forwards[0]  # one step per forward of row 0
    assert {s.mode for s in steps} == {"refine"}
    blocks = {}
    for step in steps:
        assert step.accepted is None
        assert len(step.tokens) == len(step.changed) == len(step.top_ids) == len(step.top_probs)
        assert len(step.draft) == len(step.tokens) - 1
        for ids_, probs in zip(step.top_ids, step.top_probs):
            assert len(ids_) == 3 and probs == sorted(probs, reverse=True) and sum(probs) <= 1 + 1e-9
        if step.round == 0:
            assert all(step.changed) and set(step.draft) <= {EOS}
        else:  # the previous round's block is this round's input
            previous = blocks[step.block][-1]
            assert step.draft == previous.tokens[:-1]
            assert step.changed == [a != b for a, b in zip(step.tokens, previous.tokens)]
        blocks.setdefault(step.block, []).append(step)
    assert [s.round for s in blocks[0]] == list(range(len(blocks[0])))
    committed = [t for block in blocks.values() for t in block[-1].tokens]
    generated = generated_rows(out, ids.size(1))[0]
    assert committed[: len(generated)] == generated  # the last block is cut after a stop id


def test_trace_shows_jacobi_drafts_and_what_they_confirmed(models):
    model = models["qwen2"]
    ids, _ = prompts([4])
    steps = []
    out = iterative_generate(
        model, ids, eos_token_id=EOS, add_eos_length=4, mode="jacobi", max_new_tokens=40, adaptive_draft=False,
        return_dict=True, trace=steps.append,
    )  # fmt: skip
    assert [s.block for s in steps] == list(range(out.num_forwards))
    generated = []
    for step in steps:
        assert step.mode == "jacobi" and len(step.tokens) == len(step.draft) + 1
        confirmed = 0
        while confirmed < len(step.draft) and step.draft[confirmed] == step.tokens[confirmed]:
            confirmed += 1
        assert step.accepted == confirmed
        assert step.changed[: len(step.draft)] == [t != d for t, d in zip(step.tokens, step.draft)]
        generated += step.tokens[: step.accepted + 1]
    assert generated[:40] == generated_rows(out, 4)[0]
    assert any(s.accepted for s in steps)


def stops_in_the_first_block(model, n, r):
    """One-token prompts and stop ids under which row 0 stops in its first block and another row goes on,
    with each row's reference (rows stop at different blocks)."""
    for seed in range(6):
        ids, mask = prompts([1] * 5, seed=seed)
        free = naive_refine(model, ids[0].tolist(), [EOS], n, r, 16, 8192)[0]
        for stop in sorted(set(free[: n + 1])):
            expected = [naive_refine(model, row, [EOS, stop], n, r, 16, 8192) for row in ids.tolist()]
            lengths = [len(tokens) for tokens, _ in expected]
            if lengths[0] <= n + 1 < max(lengths):
                return ids, mask, [EOS, stop], expected
    pytest.fail("no one-token prompt stops in the first block while another row goes on")


@pytest.mark.parametrize("arch", ["llama", "qwen3", "mistral"])  # the tiny GPT-2 ends every row in its first block
@pytest.mark.parametrize("use_cache", [True, False])
@pytest.mark.parametrize("n,r", [(3, 2), (2, 3), (4, 1)])
def test_refine_with_one_token_prompts_and_rows_stopping_at_different_blocks(models, arch, use_cache, n, r):
    """One-token prompts: rolling back the first block leaves the cache no column, and a row stopping in that
    block shrinks the batch (this crashed with the cache on). Each row still equals the reference."""
    model = models[arch]
    ids, mask, stop_ids, expected = stops_in_the_first_block(model, n, r)
    out = iterative_generate(
        model, ids, mask, eos_token_id=stop_ids, add_eos_length=n, refine_iter=r, max_new_tokens=16,
        use_cache=use_cache, return_dict=True,
    )  # fmt: skip
    assert generated_rows(out, 1) == [tokens for tokens, _ in expected]
    assert out.finish_reason == [reason for _, reason in expected]


@pytest.mark.parametrize("mode", ["jacobi", "refine"])
def test_a_continued_sampled_call_draws_what_one_call_draws(models, mode):
    """``sample_offsets``: a call that goes on from an earlier one's tokens (same keys) samples the same text."""
    from dllm.generation.sampling import prompt_keys

    model = models["llama"]
    ids, mask = prompts([4, 7], seed=3)
    settings = dict(eos_token_id=EOS, add_eos_length=3, refine_iter=2, mode=mode, temperature=0.9)
    for seed in range(20):  # a seed whose rows both run to the budget (the random model writes EOS at times)
        whole = iterative_generate(
            model, ids, mask, max_new_tokens=20, generator=torch.Generator().manual_seed(seed), return_dict=True,
            **settings,
        )  # fmt: skip
        if whole.finish_reason == ["length", "length"]:
            break
    assert whole.finish_reason == ["length", "length"]
    whole = whole.sequences
    first = 8  # two whole blocks, so refine's blocks stay where they were
    rows = [ids[i][mask[i].bool()].tolist() + whole[i, ids.size(1) : ids.size(1) + first].tolist() for i in range(2)]
    more, more_mask = prompts([len(row) for row in rows])
    for i, row in enumerate(rows):
        more[i, more.size(1) - len(row) :] = torch.tensor(row)
    rest = iterative_generate(
        model, more, more_mask, max_new_tokens=20 - first, generator=torch.Generator().manual_seed(seed),
        sample_keys=prompt_keys(ids, mask), sample_offsets=[first, first], **settings,
    )  # fmt: skip
    assert torch.equal(rest[:, more.size(1) :], whole[:, ids.size(1) + first :])
    with pytest.raises(ValueError, match="sample_offsets must hold one int >= 0 per row"):
        iterative_generate(model, ids, mask, sample_offsets=[0, -1], **settings)

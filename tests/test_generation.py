"""Pin the generation engine to SPEC sections 2-5 on tiny float64 models.

Exactness is the point: every comparison is token for token.
"""

import pytest
import torch
from conftest import ARCHS, EOS, VOCAB

from dllm import GenerateOutput, iterative_generate
from dllm.generation import filter_logits, pick_tokens


def prompts(lengths: list[int], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded random prompts (no special ids) of the given lengths."""
    gen = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, length in enumerate(lengths):
        ids[row, width - length :] = torch.randint(3, VOCAB, (length,), generator=gen)
        mask[row, width - length :] = 1
    return ids, mask


def hf_greedy(model, ids, mask, max_new_tokens, eos=EOS):
    return model.generate(
        input_ids=ids,
        attention_mask=mask,
        do_sample=False,
        max_new_tokens=max_new_tokens,
        eos_token_id=eos,
        pad_token_id=0,
    )


def naive_refine(model, prompt: list[int], stop_ids: list[int], n: int, r: int, max_new: int, max_length: int):
    """SPEC section 2 written straight: one row, no cache, no early exit."""
    generated: list[int] = []
    while True:
        k = min(n + 1, max_new - len(generated), max_length - len(prompt) - len(generated))
        if k <= 0:
            return generated, "length"
        context = prompt + generated
        x = torch.tensor([context + [stop_ids[0]] * (k - 1)])
        block = model(x).logits[0, len(context) - 1 : len(context) - 1 + k].argmax(-1).tolist()
        for _ in range(r - 1):
            x = torch.tensor([context + block[: k - 1]])
            block = model(x).logits[0, len(context) - 1 : len(context) - 1 + k].argmax(-1).tolist()
        generated += block
        stops = [i for i, t in enumerate(block) if t in stop_ids]
        if stops:
            del generated[len(generated) - len(block) + stops[0] + 1 :]
            return generated, "eos"


def generated_rows(out: GenerateOutput, width: int) -> list[list[int]]:
    return [out.sequences[i, width : width + int(n)].tolist() for i, n in enumerate(out.new_tokens)]


def frequent_token(model, ids, mask, steps=30) -> int:
    """A token the model emits often: a stop id that really stops rows."""
    out = iterative_generate(model, ids, mask, eos_token_id=EOS, add_eos_length=0, refine_iter=1, max_new_tokens=steps)
    return int(out[:, ids.size(1) :].flatten().mode().values)


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
@pytest.mark.parametrize("n", [1, 3, 7, 16])
def test_jacobi_equals_hf_generate(models, arch, n):
    model = models[arch]
    ids, mask = prompts([6, 2, 11])
    expected = hf_greedy(model, ids, mask, 25)
    got = iterative_generate(
        model, ids, mask, eos_token_id=EOS, pad_token_id=0, add_eos_length=n, mode="jacobi", max_new_tokens=25
    )
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
    """A model that repeats itself drafts correctly: more than one token per forward."""
    model = models["qwen2"]
    ids, mask = prompts([4])
    out = iterative_generate(
        model, ids, mask, eos_token_id=EOS, add_eos_length=3, mode="jacobi", max_new_tokens=200, return_dict=True
    )
    # greedy decoding of a tiny random model falls into a cycle; the shifted draft
    # then predicts it, so jacobi must beat one token per forward
    assert out.num_forwards < 200
    assert out.tokens_per_forward > 1.0
    assert torch.equal(out.sequences, hf_greedy(model, ids, mask, 200))


# --- refine against the SPEC's reference ------------------------------------


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
    model = models[arch]
    ids, mask = prompts([4, 10, 7])
    kwargs = dict(eos_token_id=EOS, add_eos_length=n, refine_iter=r, max_new_tokens=27, mode=mode, return_dict=True)
    cached = iterative_generate(model, ids, mask, use_cache=True, **kwargs)
    uncached = iterative_generate(model, ids, mask, use_cache=False, **kwargs)
    assert torch.equal(cached.sequences, uncached.sequences)
    assert cached.num_forwards == uncached.num_forwards


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("mode,n,r", [("refine", 3, 2), ("refine", 5, 3), ("jacobi", 3, 1)])
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
        return_dict=True,
    )
    batched = iterative_generate(model, ids, mask, **kwargs)
    for row, length in enumerate(lengths):
        alone = iterative_generate(model, ids[row : row + 1, ids.size(1) - length :], **kwargs)
        assert generated_rows(batched, ids.size(1))[row] == generated_rows(alone, length)[0]
        assert batched.finish_reason[row] == alone.finish_reason[0]
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


def test_gumbel_sampling_matches_the_softmax_distribution():
    logits = torch.tensor([[[2.0, 1.0, 0.0, -1.0, -3.0]]], dtype=torch.float64)
    gen = torch.Generator().manual_seed(0)
    draws = 20000
    noise = -torch.log(-torch.log(torch.rand(draws, 1, 5, generator=gen, dtype=torch.float64)))
    tokens = pick_tokens(logits.expand(draws, 1, 5), 1.3, None, None, noise).flatten()
    freq = torch.bincount(tokens, minlength=5).double() / draws
    assert torch.allclose(freq, (logits[0, 0] / 1.3).softmax(-1), atol=0.015)


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

"""Sampling: the full path's distribution, keys instead of batch positions, jacobi stays lossless."""

import pytest
import torch
from conftest import EOS, VOCAB
from generation_helpers import generated_rows, prompts

from dllm import iterative_generate
from dllm.generation.sampling import Sampler, filter_logits, prompt_keys, uniforms

SETTINGS = dict(temperature=0.8, top_k=12, top_p=0.85)


def chi_square(counts: torch.Tensor, probs: torch.Tensor) -> tuple[float, int]:
    """Pearson's statistic over the tokens of positive probability, and its degrees of freedom."""
    keep = probs > 0
    expected = probs[keep] * counts.sum()
    return float(((counts[keep] - expected) ** 2 / expected).sum()), int(keep.sum()) - 1


@pytest.mark.parametrize("mode", ["refine", "jacobi"])
def test_full_path_samples_the_filtered_softmax(models, mode):
    """4,000 rows of one prompt, one key each: the first generated token, through ``iterative_generate``
    (temperature, top-k and top-p together), follows softmax of the filtered logits."""
    model = models["llama"]
    ids, _ = prompts([5], seed=3)
    draws = 4000
    out = iterative_generate(
        model, ids.expand(draws, -1), eos_token_id=EOS, add_eos_length=2, refine_iter=1, max_new_tokens=1, mode=mode,
        sample_keys=list(range(draws)), generator=torch.Generator().manual_seed(0), **SETTINGS,
    )  # fmt: skip
    counts = torch.bincount(out[:, -1], minlength=VOCAB).double()
    with torch.no_grad():
        logits = model(ids).logits[0, -1]
    probs = filter_logits(logits[None] / SETTINGS["temperature"], SETTINGS["top_k"], SETTINGS["top_p"]).softmax(-1)[0]
    assert 3 <= int((probs > 0).sum()) <= SETTINGS["top_k"]  # the filters really bite
    assert counts[probs == 0].sum() == 0  # never outside top-k / the nucleus
    stat, dof = chi_square(counts, probs)
    assert stat < dof + 5 * (2 * dof) ** 0.5  # ~5 sigma above the mean of a chi-square


def test_sampler_matches_the_reference_on_a_large_vocabulary():
    """The chunked inverse CDF across chunk borders, and top-p's rejection path, on 5,000 ids."""
    torch.manual_seed(0)
    logits = torch.randn(1, 1, 5000, dtype=torch.float64) * 3
    for top_k, top_p in [(None, 0.6), (2000, None), (300, 0.95)]:
        sampler = Sampler(1.1, top_k, top_p, seed=11)
        draws = 20000
        tokens = sampler.pick(logits.expand(draws, 1, -1), list(range(draws)), [0] * draws).flatten()
        probs = filter_logits(logits[0] / 1.1, top_k, top_p).softmax(-1)[0]
        counts = torch.bincount(tokens, minlength=5000).double()
        assert counts[probs == 0].sum() == 0
        # compare on the 20 most likely ids plus the rest lumped together
        top = probs.topk(20).indices
        rest = torch.ones_like(probs, dtype=torch.bool)
        rest[top] = False
        stat, dof = chi_square(
            torch.cat([counts[top], counts[rest].sum()[None]]), torch.cat([probs[top], probs[rest].sum()[None]])
        )
        assert stat < dof + 5 * (2 * dof) ** 0.5, (top_k, top_p)


def test_a_tiny_top_p_keeps_only_the_most_likely_token():
    logits = torch.tensor([[[0.3, 0.2, 0.1, 0.0]]], dtype=torch.float64)  # nearly flat: rejections, then the sort
    tokens = Sampler(1.0, None, 1e-6, seed=1).pick(logits.expand(50, 1, 4), list(range(50)), [0] * 50)
    assert (tokens == 0).all()


@pytest.mark.parametrize("mode,n", [("refine", 3), ("jacobi", 4)])
def test_a_prompt_samples_the_same_in_any_batch(models, mode, n):
    """Keys come from the prompt (or the caller), never from the row index or the batch size."""
    model = models["qwen2"]
    ids, mask = prompts([5, 8, 3, 6], seed=5)
    width = ids.size(1)
    kwargs = dict(
        eos_token_id=EOS, add_eos_length=n, max_new_tokens=16, mode=mode, return_dict=True,
        generator=torch.Generator().manual_seed(4), **SETTINGS,
    )  # fmt: skip
    full = generated_rows(iterative_generate(model, ids, mask, **kwargs), width)
    kwargs["generator"] = torch.Generator().manual_seed(4)
    order = [2, 0, 3, 1]  # shuffled, and row 1's prompt twice
    shuffled = iterative_generate(model, ids[order + [1]], mask[order + [1]], **kwargs)
    assert generated_rows(shuffled, width) == [full[i] for i in order + [1]]
    for row, length in enumerate([5, 8, 3, 6]):
        kwargs["generator"] = torch.Generator().manual_seed(4)
        alone = iterative_generate(model, ids[row : row + 1, width - length :], **kwargs)
        assert generated_rows(alone, length)[0] == full[row]


def test_sample_keys_replace_the_prompt_key(models):
    model = models["llama"]
    ids, mask = prompts([6, 6], seed=2)
    ids[1], mask[1] = ids[0], mask[0]  # the same prompt twice

    def sample(keys, rows=(0, 1)):
        return iterative_generate(
            model, ids[list(rows)], mask[list(rows)], eos_token_id=EOS, max_new_tokens=20, mode="jacobi",
            add_eos_length=3, temperature=1.5, sample_keys=keys, generator=torch.Generator().manual_seed(0),
        )  # fmt: skip

    same = sample(None)
    assert torch.equal(same[0], same[1])  # one prompt, one key, one sample
    keyed = sample([101, 202])
    assert not torch.equal(keyed[0], keyed[1])
    assert torch.equal(sample([202], rows=(1,))[0], keyed[1])  # a key's sample does not depend on the batch
    with pytest.raises(ValueError, match="sample_keys"):
        sample([1, 2, 3])


@pytest.mark.parametrize("n,adaptive", [(1, True), (4, True), (9, True), (4, False)])
def test_jacobi_sampling_with_top_p_equals_token_by_token_sampling(models, n, adaptive):
    model = models["gpt2"]
    ids, mask = prompts([5, 3, 8], seed=6)

    def sample(mode, n):
        return iterative_generate(
            model, ids, mask, eos_token_id=EOS, add_eos_length=n, refine_iter=1, max_new_tokens=30, mode=mode,
            adaptive_draft=adaptive, generator=torch.Generator().manual_seed(3), **SETTINGS,
        )  # fmt: skip

    assert torch.equal(sample("jacobi", n), sample("refine", 0))


def test_uniforms_depend_only_on_seed_key_position_and_attempt():
    one = uniforms(7, [5, 6, 5], [3, 3, 4])
    assert uniforms(7, [5], [3])[0] == one[0] and uniforms(7, [5], [4])[0] == one[2]
    assert len({*one.tolist(), *uniforms(8, [5], [3]).tolist(), *uniforms(7, [5], [3], attempt=1).tolist()}) == 5
    many = uniforms(1, list(range(20000)), [0] * 20000)
    assert 0 <= many.min() and many.max() < 1 and abs(many.mean() - 0.5) < 0.01


def test_prompt_keys_ignore_padding():
    ids = torch.tensor([[0, 0, 5, 6], [5, 6, 7, 8], [9, 9, 5, 6]])
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1], [0, 0, 1, 1]])
    a, b, c = prompt_keys(ids, mask)
    assert a == c != b
    assert prompt_keys(torch.tensor([[5, 6]]), torch.ones(1, 2, dtype=torch.long)) == [a]


def test_filter_logits_keeps_tied_tokens_together():
    logits = torch.tensor([[1.0, 1.0, 0.0]]).log_softmax(-1)  # probabilities ~[0.42, 0.42, 0.16]
    assert (~torch.isinf(filter_logits(logits, top_p=0.3))).tolist() == [[True, True, False]]
    assert (~torch.isinf(filter_logits(logits, top_p=0.9))).tolist() == [[True, True, True]]

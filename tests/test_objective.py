"""Pin the iterative-refine objective to SPEC section 6 against a naive per-row computation."""

import pytest
import torch
import torch.nn.functional as F
from conftest import EOS, build_model

from dllm.objective import eos_noise_mask, iterative_refine_loss


def make_batch(seed: int = 0):
    """Right-padded rows: prompt, response ending in EOS, padding."""
    gen = torch.Generator().manual_seed(seed)
    rows = [(4, 6), (2, 9), (7, 3)]  # (prompt length, response length incl. EOS)
    width = max(p + r for p, r in rows) + 2
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    attn = torch.zeros_like(ids)
    resp = torch.zeros_like(ids)
    for b, (p, r) in enumerate(rows):
        ids[b, : p + r] = torch.randint(3, 40, (p + r,), generator=gen)
        ids[b, p + r - 1] = EOS
        attn[b, : p + r] = 1
        resp[b, p : p + r] = 1
    return ids, attn, resp, rows


def naive_loss(model, ids, rows, noise: float, weights):
    """SPEC section 6 row by row, no padding anywhere: noise 0 keeps the response, 1 replaces it."""
    per_round = []
    for r in range(len(weights)):
        tokens_loss, count = 0.0, 0
        for b, (p, n) in enumerate(rows):
            clean = ids[b, : p + n]
            x = clean.clone()
            if noise == 1:
                x[p:] = EOS
            for _ in range(r + 1):
                logits = model(x[None]).logits[0]
                nxt = clean.clone()
                nxt[p:] = logits[p - 1 : p + n - 1].argmax(-1)
                current, x = logits, nxt
            tokens_loss = tokens_loss + F.cross_entropy(current[p - 1 : p + n - 1], clean[p:], reduction="sum")
            count += n
        per_round.append(tokens_loss / count)
    return sum(w * loss for w, loss in zip(weights, per_round)), per_round


@pytest.mark.parametrize("noise", [0.0, 1.0])
@pytest.mark.parametrize("weights", [[1.0], [1.0, 0.5], [0.2, 1.0, 2.0]])
@pytest.mark.parametrize("chunk", [None, 5])
def test_loss_equals_naive_per_row_computation(noise, weights, chunk):
    model = build_model("qwen2")
    ids, attn, resp, rows = make_batch()
    out = iterative_refine_loss(
        model,
        ids,
        attn,
        resp,
        eos_token_id=EOS,
        num_rounds=len(weights),
        loss_weights=weights,
        noise_min=noise,
        noise_max=noise,
        loss_chunk_size=chunk,
    )
    expected, per_round = naive_loss(model, ids, rows, noise, weights)
    assert torch.allclose(out.loss, expected, atol=1e-10)
    for got, want in zip(out.round_losses, per_round):
        assert torch.allclose(got, want, atol=1e-10)
    assert out.noise_ratio == noise
    assert out.loss.requires_grad and not out.round_losses[0].requires_grad


def test_chunked_loss_has_the_same_gradients():
    model = build_model("llama")
    ids, attn, resp, _ = make_batch(1)
    grads = []
    for chunk in (None, 3):
        model.zero_grad()
        out = iterative_refine_loss(
            model, ids, attn, resp, eos_token_id=EOS, loss_chunk_size=chunk, generator=torch.Generator().manual_seed(0)
        )
        out.loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert torch.allclose(grads[0], grads[1], atol=1e-10)


@pytest.mark.parametrize("noise", [0.0, 1.0])
def test_padding_never_counts(noise):
    """Extra padding (any token ids, masked) changes nothing."""
    model = build_model("gpt2")
    ids, attn, resp, _ = make_batch(2)
    wider = torch.cat([ids, torch.randint(3, 40, (ids.size(0), 5))], dim=1)  # junk ids under padding
    pad = torch.zeros(ids.size(0), 5, dtype=torch.long)
    kwargs = dict(eos_token_id=EOS, num_rounds=2, noise_min=noise, noise_max=noise)
    a = iterative_refine_loss(model, ids, attn, resp, **kwargs)
    b = iterative_refine_loss(model, wider, torch.cat([attn, pad], 1), torch.cat([resp, pad], 1), **kwargs)
    assert torch.allclose(a.loss, b.loss, atol=1e-10)


@pytest.mark.parametrize("t", [0.25, 0.6])
def test_empirical_noise_ratio_matches_t(t):
    response = torch.zeros(64, 300, dtype=torch.long)
    response[:, 20:280] = 1
    noise = eos_noise_mask(response, t, t, torch.Generator().manual_seed(0))
    assert not noise[:, :20].any() and not noise[:, 280:].any()  # prompt and padding untouched
    assert abs(noise.sum().item() / response.sum().item() - t) < 0.01


def test_noise_ratio_is_uniform_between_bounds():
    response = torch.ones(2000, 200, dtype=torch.long)
    noise = eos_noise_mask(response, 0.1, 0.9, torch.Generator().manual_seed(0))
    per_row = noise.double().mean(-1)
    assert per_row.min() > 0.05 and per_row.max() < 0.95
    assert abs(per_row.mean().item() - 0.5) < 0.02


def test_block_noise_is_a_clean_prefix_then_an_eos_run():
    response = torch.zeros(50, 40, dtype=torch.long)
    response[:, 10:35] = 1
    noise = eos_noise_mask(response, 0.0, 1.0, torch.Generator().manual_seed(0), schedule="block", block_size=6)
    for row in noise:
        where = row.nonzero().flatten()
        assert 1 <= len(where) <= 6 and where.min() >= 10 and where.max() < 35
        assert torch.equal(where, torch.arange(where.min(), where.min() + len(where)))  # one contiguous run


def test_ar_loss_weight_adds_the_clean_next_token_loss():
    model = build_model("qwen2")
    ids, attn, resp, rows = make_batch()
    kwargs = dict(eos_token_id=EOS, num_rounds=1, noise_min=1.0, noise_max=1.0)
    base = iterative_refine_loss(model, ids, attn, resp, **kwargs)
    with_ar = iterative_refine_loss(model, ids, attn, resp, ar_loss_weight=0.5, **kwargs)
    clean, _ = naive_loss(model, ids, rows, 0.0, [1.0])
    assert torch.allclose(with_ar.ar_loss, clean, atol=1e-10)
    assert torch.allclose(with_ar.loss, base.loss + 0.5 * clean, atol=1e-10)


@pytest.mark.parametrize(
    "kwargs,name",
    [
        (dict(num_rounds=0), "num_rounds"),
        (dict(loss_weights=[1.0]), "loss_weights"),
        (dict(noise_min=0.5, noise_max=0.2), "noise_min"),
        (dict(noise_schedule="x"), "noise_schedule"),
    ],
)
def test_invalid_arguments_raise(kwargs, name):
    ids, attn, resp, _ = make_batch()
    with pytest.raises(ValueError, match=name):
        iterative_refine_loss(build_model("qwen2"), ids, attn, resp, eos_token_id=EOS, **kwargs)

"""Pin the iterative-refine objective (docs/method.md, section 8) to a naive per-row computation."""

import pytest
import torch
import torch.nn.functional as F
from conftest import EOS, build_model
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from dllm.training.objective import eos_noise_mask, iterative_refine_loss, response_targets, windowed_targets


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
    """The objective row by row, no padding anywhere: noise 0 keeps the response, 1 replaces it."""
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


# What each architecture does after its LM head: the chunked loss, which runs the decoder and the head apart, must
# do it too. (name, config overrides, the setting that scales the logits, its value without effect)
FALCON_MAMBA = {"mamba_d_ssm": 16, "mamba_n_heads": 2, "mamba_d_head": 8, "mamba_d_state": 4, "mamba_chunk_size": 4}
HEAD_SCALINGS = [
    ("gemma2", {"final_logit_softcapping": 2.0, "head_dim": 8}, "final_logit_softcapping", None),  # tanh cap
    ("granite", {"logits_scaling": 4.0}, "logits_scaling", 1.0),  # logits / logits_scaling
    ("cohere", {"logit_scale": 0.25}, "logit_scale", 1.0),  # logits * logit_scale
    # logits * the decoder's lm_head_multiplier
    ("falcon_h1", {"lm_head_multiplier": 3.0, **FALCON_MAMBA}, "lm_head_multiplier", 1.0),
]


@pytest.mark.parametrize("arch,overrides,setting,neutral", HEAD_SCALINGS, ids=[a[0] for a in HEAD_SCALINGS])
def test_chunked_loss_goes_through_the_model_s_own_head(arch, overrides, setting, neutral):
    """Chunked == unchunked loss and gradients for every architecture that scales or caps its logits."""
    torch.manual_seed(0)
    config = AutoConfig.for_model(
        arch, vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, eos_token_id=EOS, pad_token_id=0, **overrides,
    )  # fmt: skip
    model = AutoModelForCausalLM.from_config(config).double().eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(30.0)  # raw logits of several units: the scaling changes the loss a lot
    ids, attn, resp, _ = make_batch(3)

    def loss_and_grads(chunk):
        model.zero_grad()
        out = iterative_refine_loss(
            model, ids, attn, resp, eos_token_id=EOS, loss_chunk_size=chunk, generator=torch.Generator().manual_seed(0)
        )
        out.loss.backward()
        return out.loss.detach(), torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])

    (loss, grads), (chunked_loss, chunked_grads) = loss_and_grads(None), loss_and_grads(4)
    assert torch.allclose(loss, chunked_loss, atol=1e-10)
    assert torch.allclose(grads, chunked_grads, atol=1e-10)
    # Cohere and Falcon-H1 read copies of the setting made at init (on the model, on its decoder)
    owner = {"cohere": model, "falcon_h1": model.model}.get(arch, model.config)
    setattr(owner, setting, neutral)
    plain, _ = loss_and_grads(None)
    assert abs(plain - loss) > 0.5  # the scaling is material here, so the equality above tests it


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


@pytest.mark.parametrize("noise", [0.0, 1.0])
def test_left_padding_before_a_row_without_prompt_predicts_nothing(noise):
    """A row that is all response, left-padded: the padding before its first token scores no target."""
    model = build_model("llama")
    gen = torch.Generator().manual_seed(5)
    ids = torch.randint(3, 40, (1, 6), generator=gen)
    ids[0, -1] = EOS
    ones = torch.ones_like(ids)
    padded = torch.cat([torch.randint(3, 40, (1, 3), generator=gen), ids], dim=1)
    mask = torch.cat([torch.zeros(1, 3, dtype=torch.long), ones], dim=1)
    kwargs = dict(eos_token_id=EOS, num_rounds=2, noise_min=noise, noise_max=noise, ar_loss_weight=1.0)
    alone = iterative_refine_loss(model, ids, ones, ones, **kwargs)
    left = iterative_refine_loss(model, padded, mask, mask, **kwargs)
    assert torch.allclose(alone.loss, left.loss, atol=1e-10)


@pytest.mark.parametrize("t", [0.25, 0.6])
def test_empirical_noise_ratio_matches_t(t):
    response = torch.zeros(64, 300, dtype=torch.long)
    response[:, 20:280] = 1
    noise = eos_noise_mask(response, t, t, torch.Generator().manual_seed(0))
    assert not noise[:, :20].any() and not noise[:, 280:].any()  # prompt and padding untouched
    assert abs(noise.sum().item() / response.sum().item() - t) < 0.01


def test_noise_ratio_is_uniform_between_bounds():
    """Per-row ratios spread like U[0.1, 0.9]: a constant t (or a narrower range) fails the quantiles."""
    response = torch.ones(2000, 400, dtype=torch.long)
    noise = eos_noise_mask(response, 0.1, 0.9, torch.Generator().manual_seed(0))
    per_row = noise.double().mean(-1)
    assert per_row.min() > 0.05 and per_row.max() < 0.95
    assert abs(per_row.mean().item() - 0.5) < 0.02
    # U[0.1, 0.9]: std 0.8 / sqrt(12) = 0.231 (plus a little binomial noise), deciles at 0.18 and 0.82
    assert abs(per_row.std().item() - 0.8 / 12**0.5) < 0.015
    deciles = torch.quantile(per_row, torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64))
    assert torch.allclose(deciles, torch.tensor([0.18, 0.5, 0.82], dtype=torch.float64), atol=0.03)


def test_block_noise_is_a_clean_prefix_then_an_eos_run():
    response = torch.zeros(50, 40, dtype=torch.long)
    response[:, 10:35] = 1
    noise = eos_noise_mask(response, 0.0, 1.0, torch.Generator().manual_seed(0), schedule="block", block_size=6)
    starts = set()
    for row in noise:
        where = row.nonzero().flatten()
        start = int(where.min())
        starts.add(start)
        # one contiguous run of exactly block_size, or shorter only where the response ends
        assert len(where) == min(6, 35 - start) and 10 <= start < 35
        assert torch.equal(where, torch.arange(start, start + len(where)))
    assert len(starts) > 10  # the cut moves from row to row


@pytest.mark.parametrize(
    "t,length,start,run",
    [(0.0, 25, 0, 6), (0.4, 25, 10, 6), (0.5, 9, 4, 5), (0.9, 25, 22, 3), (1.0, 25, 24, 1), (0.3, 1, 0, 1)],
)
def test_block_noise_position_and_length_are_exact(t, length, start, run):
    """The run starts at floor(t * length) inside the response (at most its last token) and is cut at its end."""
    response = torch.zeros(3, 40, dtype=torch.long)
    offsets = [0, 5, 12]  # different prompt lengths
    for row, offset in enumerate(offsets):
        response[row, offset : offset + length] = 1
    noise = eos_noise_mask(response, t, t, torch.Generator().manual_seed(0), schedule="block", block_size=6)
    for row, offset in enumerate(offsets):
        expected = torch.zeros(40, dtype=torch.bool)
        expected[offset + start : offset + start + run] = True
        assert torch.equal(noise[row], expected), (row, noise[row].nonzero().flatten().tolist())


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


# --- the fine-tuning recipe's options: noise_schedule="prefix", loss_window ---------------------------


def test_prefix_noise_is_a_clean_prefix_then_iid_noise() -> None:
    response = torch.zeros(400, 60, dtype=torch.long)
    response[:, 10:50] = 1
    noise = eos_noise_mask(response, 1.0, 1.0, torch.Generator().manual_seed(0), schedule="prefix")
    cuts = []
    for row in noise:  # t = 1: everything from the cut to the response's end
        where = row.nonzero().flatten()
        cuts.append(int(where.min()))
        assert torch.equal(where, torch.arange(cuts[-1], 50))
    assert min(cuts) == 10 and max(cuts) == 49  # the cut is uniform over the response
    half = eos_noise_mask(response, 0.5, 0.5, torch.Generator().manual_seed(0), schedule="prefix")
    assert not half[:, :10].any() and not half[:, 50:].any()
    assert 0.2 < half.sum() / response.sum() < 0.3  # t = 0.5 on half the response on average


def test_windowed_targets_keep_the_clean_prefix_and_a_window() -> None:
    response = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1, 1, 0], [0, 1, 1, 1, 1, 1, 1, 1, 1, 1]]).bool()
    noise = torch.zeros_like(response)
    noise[0, 4] = noise[0, 6] = True  # first noised response token: index 2 of row 0
    keep = windowed_targets(response, noise, 2) & response_targets(torch.zeros(2, 10).long(), response)[0]
    # row 0: logits at p predict p + 1; targets at response indices 0..3 (positions 2..5) are kept
    assert keep[0].nonzero().flatten().tolist() == [1, 2, 3, 4]
    assert keep[1].nonzero().flatten().tolist() == list(range(9))  # no noise: every target


def test_a_window_past_the_response_changes_nothing() -> None:
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=20, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2)).double()  # fmt: skip
    ids = torch.randint(2, 20, (3, 12))
    attn, resp = torch.ones_like(ids), torch.zeros_like(ids)
    resp[:, 4:] = 1
    kwargs = dict(eos_token_id=1, noise_schedule="prefix", noise_min=0.5, noise_max=1.0)
    full = iterative_refine_loss(model, ids, attn, resp, generator=torch.Generator().manual_seed(1), **kwargs)
    wide = iterative_refine_loss(model, ids, attn, resp, generator=torch.Generator().manual_seed(1), loss_window=8,
                                 **kwargs)  # fmt: skip
    narrow = iterative_refine_loss(model, ids, attn, resp, generator=torch.Generator().manual_seed(1), loss_window=1,
                                   **kwargs)  # fmt: skip
    assert torch.equal(full.loss, wide.loss) and not torch.equal(full.loss, narrow.loss)


@pytest.mark.parametrize("window", [1, 3, 100])
@pytest.mark.parametrize("chunk", [None, 5])
def test_windowed_loss_equals_naive_per_row_computation(window, chunk):
    """All noise: each round scores the first ``window`` response targets, and round 2 reads round 1's argmax
    there and EOS after them."""
    model = build_model("qwen2")
    ids, attn, resp, rows = make_batch(2)
    weights = [1.0, 0.5]
    out = iterative_refine_loss(model, ids, attn, resp, eos_token_id=EOS, num_rounds=2, loss_weights=weights,
                                noise_min=1.0, noise_max=1.0, loss_window=window, loss_chunk_size=chunk)  # fmt: skip
    per_round = []
    for r in range(2):
        tokens_loss, count = 0.0, 0
        for b, (p, n) in enumerate(rows):
            clean, k = ids[b, : p + n], min(window, n)
            x = clean.clone()
            x[p:] = EOS
            for _ in range(r + 1):
                logits = model(x[None]).logits[0]
                nxt = x.clone()
                nxt[p : p + k] = logits[p - 1 : p - 1 + k].argmax(-1)
                current, x = logits, nxt
            tokens_loss = tokens_loss + F.cross_entropy(current[p - 1 : p - 1 + k], clean[p : p + k], reduction="sum")
            count += k
        per_round.append(tokens_loss / count)
    for got, want in zip(out.round_losses, per_round):
        assert torch.allclose(got, want, atol=1e-10)
    assert torch.allclose(out.loss, weights[0] * per_round[0] + weights[1] * per_round[1], atol=1e-10)

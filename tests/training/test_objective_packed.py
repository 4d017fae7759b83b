"""Pin the packed objective (docs/method.md, section 8) to a naive computation: each block as its own sequence."""

import pytest
import torch
import torch.nn.functional as F
from conftest import EOS, build_model

from dllm.training.objective import iterative_refine_loss
from dllm.training.packed import CLEAN, pack_blocks, packed_attention_allowed

N = 3  # draft tokens per block


def make_batch(rows, seed: int = 0, left: bool = False):
    """Rows ``(prompt length, response length incl. EOS)``, padded right (or left) to one width."""
    gen = torch.Generator().manual_seed(seed)
    width = max(p + r for p, r in rows) + 2
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    attn, resp = torch.zeros_like(ids), torch.zeros_like(ids)
    for b, (p, r) in enumerate(rows):
        start = width - p - r if left else 0
        ids[b, start : start + p + r] = torch.randint(3, 40, (p + r,), generator=gen)
        ids[b, start + p + r - 1] = EOS
        attn[b, start : start + p + r] = 1
        resp[b, start + p : start + p + r] = 1
    return ids, attn, resp


ROWS = [(4, 6), (2, 13), (7, 3), (3, 1), (5, 2), (0, 10)]  # several blocks, a cut last block, shorter than a block,
# no prompt (the offset -1 puts the first anchor before the row)


def blocks_of(packed, b):
    """``[(anchor position, twin positions, round-0 tokens)]`` of row ``b``, read off the packed layout."""
    out = []
    for k in packed.block[b].unique().tolist():
        if k < 0:
            continue
        where = packed.block[b] == k
        anchors = packed.limit[b][where].unique()
        assert anchors.numel() == 1
        out.append((int(anchors), packed.position_ids[b][where], packed.input_ids[b][where]))
    return out


def draws(ids, seed, noise=(0.0, 1.0)):
    """The random numbers of ``pack_blocks`` with this seed, drawn in its order: an offset per row in
    ``-1 ... N - 1``, ``t`` per (row, block index), a uniform per (row, response index)."""
    gen = torch.Generator().manual_seed(seed)
    rows, width = ids.shape
    offsets = torch.randint(N + 1, (rows,), generator=gen) - 1
    t = noise[0] + (noise[1] - noise[0]) * torch.rand(rows, width + 1, generator=gen)
    return offsets.tolist(), t, torch.rand(rows, width, generator=gen)


def definition_blocks(p, n, offset):
    """``[(block index, anchor, twin positions)]`` of a row with a ``p``-token prompt and an ``n``-token response,
    from the definition alone: anchors every ``N + 1`` positions from ``p + offset``; a block is the ``N``
    positions after its anchor that are response tokens with a response target (not the closing EOS), and
    exists only if its anchor is a token of the row."""
    out = []
    for k, anchor in enumerate(range(p + offset, p + n, N + 1)):
        twins = [q for q in range(anchor + 1, anchor + N + 1) if p <= q <= p + n - 2]
        if anchor >= 0 and twins:
            out.append((k, anchor, torch.tensor(twins)))
    return out


def naive_loss(model, ids, attn, resp, weights, ar_weight, seed, consistency="hard", noise=(0.0, 1.0)):
    """Every block as its own sequence (clean text up to its anchor, then the block), row by row, no padding.

    Built from the clean rows and ``draws`` only, never from the packed layout under test: which blocks
    exist, their anchors, their round-0 tokens (EOS where the token's uniform is below its block's ``t``) and
    what each round reads come from the definition (docs/method.md, section 8).
    """
    offsets, t, uniform = draws(ids, seed, noise)
    draft = [0.0] * len(weights)
    count, ar_sum, ar_count = 0, 0.0, 0
    for b in range(ids.size(0)):
        clean = ids[b][attn[b].bool()]
        p = int((attn[b].bool() & ~resp[b].bool()).sum())  # prompt length
        clean_logits = model(clean[None]).logits[0]
        first = max(p, 1)  # the first response target that a position predicts (nothing predicts position 0)
        ar_sum = ar_sum + F.cross_entropy(clean_logits[first - 1 : -1], clean[first:], reduction="sum")
        ar_count += clean.numel() - first
        for k, anchor, twins in definition_blocks(p, clean.numel() - p, offsets[b]):
            x = torch.where(uniform[b, twins - p] < t[b, k], EOS, clean[twins])
            for r in range(len(weights)):
                logits = model(torch.cat([clean[: anchor + 1], x])[None]).logits[0]
                block_logits = logits[anchor + 1 :]
                if consistency == "soft":
                    teacher = F.log_softmax(clean_logits[twins].detach(), -1)
                    loss = (teacher.exp() * (teacher - F.log_softmax(block_logits, -1))).sum()
                else:
                    loss = F.cross_entropy(block_logits, clean[twins + 1], reduction="sum")
                draft[r] = draft[r] + loss
                x = logits[anchor:-1].argmax(-1).detach()  # the next round's block: what these logits predict
            count += twins.numel()
    draft = [d / max(count, 1) for d in draft]
    ar = ar_sum / ar_count
    return sum(w * d for w, d in zip(weights, draft)) + ar_weight * ar, draft, ar


def packed_loss(model, ids, attn, resp, weights, seed=0, **kwargs):
    settings = dict(noise_schedule="packed", block_size=N, noise_min=0.0, noise_max=1.0, num_rounds=len(weights))
    settings.update(kwargs)
    return iterative_refine_loss(model, ids, attn, resp, eos_token_id=EOS, loss_weights=weights,
                                 generator=torch.Generator().manual_seed(seed), **settings)  # fmt: skip


def grads(model):
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


# Llama-family RMSNorm computes in float32 even in a float64 model, so their gradients, summed in another order
# here than in the naive computation, agree to ~1e-8 only; GPT-2 (LayerNorm) is float64 throughout.
GRAD_ATOL = {"gpt2": 1e-10, "qwen2": 1e-7, "llama": 1e-7}


@pytest.mark.parametrize("weights", [[1.0], [1.0, 0.5], [0.2, 1.0, 2.0]])
@pytest.mark.parametrize("chunk", [None, 4])
@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("arch", ["gpt2", "qwen2"])
def test_packed_loss_and_gradients_equal_each_block_as_its_own_sequence(weights, chunk, attn_implementation, arch):
    model = build_model(arch)
    model.set_attn_implementation(attn_implementation)
    ids, attn, resp = make_batch(ROWS)
    for seed in (0, 3):  # two draws of offsets and noise; seed 3 puts the no-prompt row's first anchor before it
        model.zero_grad()
        out = packed_loss(model, ids, attn, resp, weights, seed, ar_loss_weight=0.7, loss_chunk_size=chunk)
        out.loss.backward()
        got = grads(model)
        model.zero_grad()
        expected, per_round, ar = naive_loss(model, ids, attn, resp, weights, 0.7, seed)
        expected.backward()
        assert torch.allclose(out.loss, expected, atol=1e-10)
        for a, b in zip(out.round_losses, per_round):
            assert torch.allclose(a, b, atol=1e-10)
        assert torch.allclose(out.ar_loss, ar, atol=1e-10)
        assert torch.allclose(got, grads(model), atol=GRAD_ATOL[arch])
        assert 0 < out.noise_ratio < 1 and not out.round_losses[0].requires_grad


@pytest.mark.parametrize("chunk", [None, 4])
def test_soft_consistency_equals_kl_to_the_clean_stream(chunk):
    model = build_model("llama")
    ids, attn, resp = make_batch(ROWS, seed=1)
    out = packed_loss(model, ids, attn, resp, [1.0, 0.5], consistency="soft", loss_chunk_size=chunk)
    out.loss.backward()
    got = grads(model)
    model.zero_grad()
    expected, per_round, _ = naive_loss(model, ids, attn, resp, [1.0, 0.5], 0.0, 0, consistency="soft")
    expected.backward()
    assert torch.allclose(out.loss, expected, atol=1e-10)
    assert torch.allclose(got, grads(model), atol=GRAD_ATOL["llama"])
    # no noise: a noisy token sees what its clean twin sees, so the two distributions agree
    clean = packed_loss(model, ids, attn, resp, [1.0], consistency="soft", noise_max=0.0)
    assert clean.loss.abs() < 1e-10


def test_chunked_equals_unchunked_with_gradient_checkpointing():
    model = build_model("llama").train()  # no dropout in the tiny config; HF checkpoints only in train mode
    ids, attn, resp = make_batch(ROWS, seed=2)
    results = []
    for chunk, checkpointing in ((None, False), (3, False), (None, True), (5, True)):
        if checkpointing:
            model.activation_checkpointing_enable()
        model.zero_grad()
        out = packed_loss(model, ids, attn, resp, [1.0, 1.0], ar_loss_weight=1.0, loss_chunk_size=chunk)
        out.loss.backward()
        results.append((out.loss.detach(), grads(model)))
    for loss, g in results[1:]:
        assert torch.allclose(loss, results[0][0], atol=1e-10) and torch.allclose(g, results[0][1], atol=1e-10)


def test_padding_side_and_batch_neighbours_change_nothing():
    """A row's loss terms are the same left- or right-padded and next to rows of other lengths."""
    model = build_model("gpt2")
    ids, attn, resp = make_batch(ROWS)
    left = make_batch(ROWS, left=True)
    a = packed_loss(model, ids, attn, resp, [1.0, 1.0])
    b = packed_loss(model, *left, [1.0, 1.0])
    assert torch.allclose(a.loss, b.loss, atol=1e-10) and torch.allclose(a.ar_loss, b.ar_loss, atol=1e-10)


def test_blocks_tile_the_response_from_a_random_offset():
    """Anchors every N + 1 tokens; drafts cover every position after the first anchor but the anchors and the
    closing EOS (a cut last block at the very end); the offset takes all N + 1 values over draws."""
    rows = [(4, 17), (2, 9), (6, 4), (0, 10)]
    ids, attn, resp = make_batch(rows)
    offsets = set()
    for seed in range(60):
        packed = pack_blocks(ids, attn, resp, block_size=N, eos_token_id=EOS, noise_min=0.0, noise_max=0.0,
                             generator=torch.Generator().manual_seed(seed))  # fmt: skip
        row_offsets = draws(ids, seed)[0]
        for b, (p, n) in enumerate(rows):
            got = [(anchor, twins.tolist()) for anchor, twins, _ in blocks_of(packed, b)]
            assert got == [(anchor, twins.tolist()) for _, anchor, twins in definition_blocks(p, n, row_offsets[b])]
            for _, twins, tokens in blocks_of(packed, b):  # noise 0: the clean tokens
                assert torch.equal(tokens, ids[b][twins])
            offsets.add(row_offsets[b])
    assert offsets == set(range(-1, N))


@pytest.mark.parametrize("seed", range(8))
def test_a_row_without_prompt_keeps_every_block_after_a_real_anchor(seed):
    """10 response tokens and no prompt at N = 3: offset -1 puts the first anchor before the row, which drops
    that block only; the blocks anchored at positions 3 and 7 draft 4 tokens (all were dropped once)."""
    ids, attn, resp = make_batch([(0, 10)])
    gen = torch.Generator().manual_seed(seed)
    packed = pack_blocks(ids, attn, resp, block_size=N, eos_token_id=EOS, noise_min=1.0, noise_max=1.0,
                         generator=gen)  # fmt: skip
    (offset,), _, _ = draws(ids, seed)
    drafted = sorted(packed.position_ids[0][packed.noisy[0]].tolist())
    wanted = {-1: [4, 5, 6, 8], 0: [1, 2, 3, 5, 6, 7], 1: [2, 3, 4, 6, 7, 8], 2: [3, 4, 5, 7, 8]}[offset]
    assert drafted == wanted
    model = build_model("gpt2")
    out = packed_loss(model, ids, attn, resp, [1.0, 1.0], seed, noise_min=1.0)
    expected, _, _ = naive_loss(model, ids, attn, resp, [1.0, 1.0], 0.0, seed, noise=(1.0, 1.0))
    assert out.round_losses[0] > 0 and torch.allclose(out.loss, expected, atol=1e-10)


def test_responses_shorter_than_a_block():
    """One token (the EOS): no block; two: at most one draft (the first token, from the prompt's last)."""
    ids, attn, resp = make_batch([(3, 1), (3, 2)])
    seen_draft = False
    for seed in range(20):
        packed = pack_blocks(ids, attn, resp, block_size=N, eos_token_id=EOS, noise_min=1.0, noise_max=1.0,
                             generator=torch.Generator().manual_seed(seed))  # fmt: skip
        assert not packed.noisy[0].any()
        drafts = packed.noisy[1].nonzero().flatten()
        assert drafts.numel() <= 1
        if drafts.numel():
            seen_draft = True
            (col,) = drafts.tolist()
            assert packed.input_ids[1, col] == EOS and packed.position_ids[1, col] == 3
            assert packed.limit[1, col] == 2 and packed.targets[1, col] == ids[1, 4]
    assert seen_draft
    model = build_model("qwen2")
    out = packed_loss(model, *make_batch([(3, 1)]), [1.0, 1.0], ar_loss_weight=1.0)
    assert out.round_losses[0] == 0 and torch.isfinite(out.loss)  # no draft: the AR term alone


def test_attention_pattern():
    """Clean: causal on the clean stream. Noisy: clean up to the anchor, its block causally. Padding: itself."""
    ids, attn, resp = make_batch([(2, 8), (2, 3)])
    packed = pack_blocks(ids, attn, resp, block_size=N, eos_token_id=EOS, noise_min=0.5, noise_max=0.5,
                         generator=torch.Generator().manual_seed(3))  # fmt: skip
    allowed = packed_attention_allowed(packed)
    for b in range(2):
        pos, block, limit = packed.position_ids[b], packed.block[b], packed.limit[b]
        for q in range(allowed.size(1)):
            for k in range(allowed.size(2)):
                if block[q] == -2:
                    want = q == k
                elif block[k] == CLEAN:
                    want = bool(pos[k] <= limit[q])
                else:
                    want = bool(block[k] == block[q] and pos[k] <= pos[q])
                assert bool(allowed[b, q, k]) == want


@pytest.mark.parametrize("t", [0.2, 0.7])
def test_noise_ratio_matches_t(t):
    ids, attn, resp = make_batch([(2, 400)] * 8)
    packed = pack_blocks(ids, attn, resp, block_size=7, eos_token_id=EOS, noise_min=t, noise_max=t,
                         generator=torch.Generator().manual_seed(0))  # fmt: skip
    noisy = packed.input_ids[packed.noisy]
    clean = ids[:, 1:][resp[:, 1:].bool()].reshape(8, -1)  # twins are response tokens: none is EOS but the last
    assert (clean[:, :-1] != EOS).all()
    assert abs((noisy == EOS).double().mean().item() - t) < 0.03
    assert abs(packed.noise_ratio.item() - t) < 0.03


def test_invalid_packed_settings_raise():
    ids, attn, resp = make_batch(ROWS)
    model = build_model("qwen2")
    with pytest.raises(ValueError, match="consistency"):
        packed_loss(model, ids, attn, resp, [1.0], consistency="x")
    with pytest.raises(ValueError, match="loss_window"):
        packed_loss(model, ids, attn, resp, [1.0], loss_window=4)
    model.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match="4-D attention masks"):
        packed_loss(model, ids, attn, resp, [1.0])


def test_the_lightning_module_trains_with_the_packed_schedule(tmp_path):
    """``model.noise_schedule: packed`` through DLLMModule: finite losses, the AR term logged, weights move."""
    import lightning as L

    from dllm.data import DLLMDataModule
    from dllm.module import DLLMModule

    torch.manual_seed(0)
    config = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 512}  # fmt: skip
    module = DLLMModule(model_config=config, tokenizer="byte", noise_schedule="packed", noise_block_size=3,
                        consistency="soft", ar_loss_weight=1.0, loss_chunk_size=16, val_generate_batches=0)  # fmt: skip
    data = DLLMDataModule(task="addition", num_train=16, num_val=4, batch_size=4, tokenizer=module.tokenizer)
    before = [p.detach().clone() for p in module.parameters()]
    trainer = L.Trainer(accelerator="cpu", max_steps=4, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, default_root_dir=tmp_path)  # fmt: skip
    trainer.fit(module, datamodule=data)
    metrics = trainer.callback_metrics
    assert torch.isfinite(metrics["train/loss"]) and torch.isfinite(metrics["train/ar_loss"])
    assert 0 < metrics["train/noise_ratio"] < 1 and torch.isfinite(metrics["val/loss"])
    assert any(not torch.equal(a, b) for a, b in zip(before, module.parameters()))


@pytest.mark.parametrize(
    "settings,name",
    [({"consistency": "kl"}, "consistency"), ({"noise_schedule": "packed", "loss_window": 16}, "loss_window")],
)
def test_module_checks_the_packed_settings_before_the_model_loads(settings, name, monkeypatch):
    from dllm.errors import UserError
    from dllm.module import DLLMModule

    monkeypatch.setattr(DLLMModule, "_build_model", lambda self: pytest.fail("the model was built"))
    with pytest.raises(UserError, match=rf"model\.{name} must be"):
        DLLMModule(model_config={"model_type": "llama"}, tokenizer="byte", **settings)


@pytest.mark.parametrize("hybrid", [False, True])
def test_sliding_window_models_see_the_window_in_positions(hybrid):
    """Mistral with a 3-token window (every layer), or Gemma2 (sliding and full layers): the naive pin holds."""
    from conftest import rope_kwargs
    from transformers import Gemma2Config, Gemma2ForCausalLM, MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    if hybrid:
        model = Gemma2ForCausalLM(Gemma2Config(**rope_kwargs(), head_dim=8, sliding_window=3))
    else:
        model = MistralForCausalLM(MistralConfig(**rope_kwargs(), sliding_window=3))
    model = model.double().eval()
    ids, attn, resp = make_batch(ROWS)
    out = packed_loss(model, ids, attn, resp, [1.0, 0.5], ar_loss_weight=1.0)
    expected, _, _ = naive_loss(model, ids, attn, resp, [1.0, 0.5], 1.0, 0)
    assert torch.allclose(out.loss, expected, atol=1e-10)

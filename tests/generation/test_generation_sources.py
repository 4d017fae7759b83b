"""Jacobi draft sources (model, n-gram lookup, recycled pool): any candidate, the same tokens."""

import pytest
import torch
from conftest import ARCHS, EOS, VOCAB
from generation_helpers import generated_rows, hf_greedy, prompts
from test_generation_windows import windowed_model

import dllm.generation.draft_sources as draft_sources
import dllm.generation.drafting as drafting
import dllm.generation.jacobi as draft_jacobi
from dllm import iterative_generate
from dllm.generation.draft_sources import NGRAM, POOL, SOURCES, NgramIndex, Pool, parse_sources
from dllm.generation.drafting import MODEL, DraftPolicy

LENGTHS = [5, 9, 3]  # left padding of 4 and 6 columns
NEW = 48


def repeating_prompts(lengths: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts that repeat a short random phrase: the n-gram source always has something to offer."""
    ids, mask = prompts(lengths, seed=5)
    phrase = ids[:, -3:]
    return ids.where(mask == 0, phrase.repeat(1, ids.size(1) // 3 + 1)[:, -ids.size(1) :]), mask


class ForcedSource:
    """Makes the policy verify ``source``'s candidate whenever it has one, and counts those forwards."""

    def __init__(self, monkeypatch, source: int):
        self.used = 0
        original = DraftPolicy.pick

        def pick(policy, rows, offers, guesses=None):
            picks, lengths = original(policy, rows, offers, guesses)
            for i, offer in enumerate(offers):
                if offer[source] is not None:
                    picks[i], lengths[i] = source, len(offer[source])
                    self.used += 1
            return picks, lengths

        monkeypatch.setattr(DraftPolicy, "pick", pick)


def hf_alone(model, ids, lengths, new):
    """HF greedy on each row alone (no padding: a windowed model's own masks)."""
    width = ids.size(1)
    rows = [hf_greedy(model, ids[i : i + 1, width - n :], None, new)[0, n:].tolist() for i, n in enumerate(lengths)]
    return [row[: row.index(EOS) + 1] if EOS in row else row for row in rows]


def hf_rows(model, ids, mask, new):
    out = hf_greedy(model, ids, mask, new)[:, ids.size(1) :].tolist()
    return [row[: row.index(EOS) + 1] if EOS in row else row for row in out]


@pytest.mark.parametrize("use_cache", [True, False])
@pytest.mark.parametrize("arch,source", [("llama", "ngram"), ("gpt2", "ngram"), ("llama", "pool"), ("qwen3", "pool")])
def test_each_source_forced_on_gives_greedy_tokens(models, arch, source, use_cache, monkeypatch):
    """Left-padded rows that confirm different counts (holes), each source verified whenever it offers."""
    model = models[arch]
    ids, mask = repeating_prompts(LENGTHS)
    forced = ForcedSource(monkeypatch, SOURCES.index(source))
    out = iterative_generate(
        model, ids, mask, eos_token_id=EOS, pad_token_id=0, add_eos_length=6, mode="jacobi", max_new_tokens=NEW,
        use_cache=use_cache, adaptive_draft=False, draft_sources=source, return_dict=True,
    )  # fmt: skip
    assert forced.used > 0
    assert generated_rows(out, ids.size(1)) == hf_rows(model, ids, mask, NEW)


@pytest.mark.parametrize("source", ["ngram", "pool", "all"])
@pytest.mark.parametrize("use_cache", [True, False])
def test_each_source_forced_on_samples_like_one_token_decoding(models, source, use_cache, monkeypatch):
    """Sampling: a drafted token is committed only where it equals the keyed sample."""
    model = models["qwen2"]
    ids, mask = repeating_prompts(LENGTHS)
    settings = dict(eos_token_id=EOS, pad_token_id=0, mode="jacobi", max_new_tokens=NEW, temperature=0.9, top_k=20)
    plain = iterative_generate(
        model, ids, mask, add_eos_length=0, generator=torch.Generator().manual_seed(3), **settings
    )
    forced = ForcedSource(monkeypatch, NGRAM if source != "pool" else POOL)
    out = iterative_generate(
        model, ids, mask, add_eos_length=5, use_cache=use_cache, adaptive_draft=False, draft_sources=source,
        generator=torch.Generator().manual_seed(3), **settings,
    )  # fmt: skip
    assert forced.used > 0
    assert torch.equal(out, plain)


@pytest.mark.parametrize("arch", ["mistral", "gemma3"])
def test_sources_on_a_sliding_window_model_stay_exact(arch, monkeypatch):
    """A window of 4 with holes from rows that confirm different n-gram lengths; each row equals HF alone."""
    model = windowed_model(arch)
    ids, mask = repeating_prompts(LENGTHS)
    forced = ForcedSource(monkeypatch, NGRAM)
    for use_cache in (True, False):
        out = iterative_generate(
            model, ids, mask, eos_token_id=EOS, pad_token_id=0, add_eos_length=6, mode="jacobi", max_new_tokens=NEW,
            use_cache=use_cache, adaptive_draft=False, draft_sources="all", return_dict=True,
        )  # fmt: skip
        assert generated_rows(out, ids.size(1)) == hf_alone(model, ids, LENGTHS, NEW)
    assert forced.used > 0


@pytest.mark.parametrize("arch", ARCHS)
def test_default_sources_with_the_adaptive_policy_stay_exact(models, arch):
    model = models[arch]
    ids, mask = repeating_prompts([7, 4, 11, 6])
    out = iterative_generate(model, ids, mask, eos_token_id=EOS, pad_token_id=0, add_eos_length=7, mode="jacobi",
                             max_new_tokens=40, return_dict=True)  # fmt: skip
    assert generated_rows(out, ids.size(1)) == hf_rows(model, ids, mask, 40)


def test_an_ngram_wrong_halfway_commits_its_right_half(models, monkeypatch):
    """The n-gram candidate holds the next 4 greedy tokens, then wrong ones: the forward confirms exactly 4
    (and commits a fifth exact token), and the output is still greedy."""
    model = models["llama"]
    ids, mask = prompts([6], seed=2)
    truth = hf_rows(model, ids, mask, 30)[0]
    prompt = ids[0].tolist()

    def lookup(index, length):
        done = len(index.tokens) - len(prompt)
        right = truth[done : done + 4]
        return right + [(t + 1) % VOCAB or 3 for t in truth[done + 4 : done + length]]

    monkeypatch.setattr(NgramIndex, "lookup", lookup)
    ForcedSource(monkeypatch, NGRAM)
    steps = []
    out = iterative_generate(
        model, ids, eos_token_id=EOS, add_eos_length=8, mode="jacobi", max_new_tokens=24, adaptive_draft=False,
        draft_sources="ngram", trace=steps.append, return_dict=True,
    )  # fmt: skip
    assert generated_rows(out, ids.size(1))[0] == truth[:24]
    assert [s.accepted for s in steps[:-1]] == [4] * (len(steps) - 1)  # partial acceptance, every forward
    assert out.num_forwards == len(steps) == -(-24 // 5)


def test_a_stale_pool_candidate_is_rejected_and_dropped(models, monkeypatch):
    """A pool entry under the prompt's last token that the model does not continue with."""
    model = models["qwen2"]
    ids, mask = prompts([6], seed=4)
    truth = hf_rows(model, ids, mask, 20)[0]
    stale = ((truth[0] + 1) % VOCAB or 3, truth[1], truth[2])
    pools = []
    original = draft_sources.DraftSources.__init__

    def planted(self, names, texts, max_draft):
        original(self, names, texts, max_draft)
        self.pool[0].add(texts[0][-1], stale)
        pools.append(self.pool[0])

    monkeypatch.setattr(draft_sources.DraftSources, "__init__", planted)
    ForcedSource(monkeypatch, POOL)  # the policy would verify the model's untested draft first
    steps = []
    out = iterative_generate(
        model, ids, eos_token_id=EOS, add_eos_length=4, mode="jacobi", max_new_tokens=20, adaptive_draft=False,
        draft_sources="pool", trace=steps.append, return_dict=True,
    )  # fmt: skip
    assert generated_rows(out, ids.size(1))[0] == truth
    assert steps[0].draft[:3] == list(stale) and steps[0].accepted == 0  # verified first, rejected at once
    assert stale not in pools[0].table.get(ids[0, -1].item(), [])  # and forgotten


def test_the_policy_never_picks_a_source_it_measured_useless():
    policy = DraftPolicy(8, 2)
    offers = [[None, [5, 6, 7, 8], None], [None, [5, 6, 7, 8], None]]
    assert policy.pick([0, 1], offers, [0, 0])[0] == [MODEL, MODEL]  # the model's drafts untested: those first
    policy.accepted([0, 1], 4, [0, 0], [True, True], [MODEL, MODEL], [8, 8])  # rejected at once
    assert policy.pick([0, 1], offers, [0, 0])[0] == [NGRAM, NGRAM]  # the model has no guesses
    for _ in range(8):  # row 0's n-grams are wrong at the first token, row 1's right
        policy.accepted([0, 1], 4, [0, 4], [True, True], [NGRAM, NGRAM], [4, 4])
    assert policy.useless(0, NGRAM) and not policy.useless(1, NGRAM)
    for _ in range(50):  # however good the model's drafts look to be, or bad, row 0 never goes back
        assert policy.pick([0, 1], offers, [0, 0])[0][0] == MODEL
        policy.accepted([0], 4, [0], [True], [MODEL], [8])
    assert policy.pick([0, 1], offers, [4, 4])[0] == [MODEL, NGRAM]


def test_generation_never_verifies_a_useless_source_again(models, monkeypatch):
    """End to end: an n-gram source that is always wrong is verified until measured useless, then never."""
    model = models["llama"]
    ids, mask = prompts([6, 8], seed=1)
    truth = hf_rows(model, ids, mask, 40)
    texts = [row[m.bool()].tolist() for row, m in zip(ids, mask)]

    def lookup(index, length):  # a candidate whose first token is never the greedy one
        row = next(r for r, text in enumerate(texts) if index.tokens[: len(text)] == text)
        done = len(index.tokens) - len(texts[row])
        return [(truth[row][done] + 1) % VOCAB or 3] * length

    monkeypatch.setattr(NgramIndex, "lookup", lookup)
    record = []
    original = DraftPolicy.pick

    def pick(policy, rows, offers, guesses=None):
        picks, lengths = original(policy, rows, offers, guesses)
        record.append([(row, source, policy.useless(row, NGRAM)) for row, source in zip(rows, picks)])
        return picks, lengths

    monkeypatch.setattr(DraftPolicy, "pick", pick)
    wrong_drafts = draft_jacobi._next_drafts

    def next_drafts(run, pending, predicted, tokens, accepted, k, failed=None):  # the model's guesses: wrong too
        pending, predicted = wrong_drafts(run, pending, predicted, tokens, accepted, k)
        return (pending + 11) % VOCAB, predicted

    monkeypatch.setattr(draft_jacobi, "_next_drafts", next_drafts)
    out = iterative_generate(model, ids, mask, eos_token_id=EOS, pad_token_id=0, add_eos_length=4, mode="jacobi",
                             max_new_tokens=40, adaptive_draft=False, draft_sources="ngram",
                             return_dict=True)  # fmt: skip
    assert generated_rows(out, ids.size(1)) == truth
    judged = 0
    for row in (0, 1):
        picks = [(source, useless) for step in record for r, source, useless in step if r == row]
        first = next((i for i, (_, useless) in enumerate(picks) if useless), None)  # measured useless ...
        if first is not None:
            judged += 1
            assert NGRAM in [source for source, _ in picks[:first]]  # ... after being tried ...
            assert NGRAM not in [source for source, _ in picks[first:]]  # ... and never picked again
    assert judged  # (a row that stops early may not get there)


def test_ngram_lookup_takes_the_latest_occurrence_and_repeats_a_tail():
    index = NgramIndex([1, 2, 3, 4, 9, 1, 2, 3, 5, 6, 1, 2, 3])
    assert index.lookup(3) == [5, 6, 1]  # the latest earlier "1 2 3", not the first
    index.extend([5, 6])
    assert index.lookup(5) == [1, 2, 3, 5, 6]  # "3 5 6" continues with the text's own tail
    assert NgramIndex([7, 8]).lookup(4) is None
    periodic = NgramIndex([4, 5, 4, 5, 4])
    assert periodic.lookup(5) == [5, 4, 5, 4, 5]


def test_pool_keeps_the_newest_few_per_key():
    pool = Pool()
    for gram in [(1,), (2,), (3,), (4,), (5,), (2,)]:
        pool.add(9, gram)
    assert pool.table[9] == [(2,), (5,), (4,), (3,)] and pool.lookup(9) == (2,) and pool.lookup(8) is None


def test_draft_sources_are_checked():
    assert parse_sources("all") == SOURCES and parse_sources("none") == ("model",)
    assert parse_sources("pool,ngram") == SOURCES and parse_sources(["ngram"]) == ("model", "ngram")
    with pytest.raises(ValueError, match="draft_sources.*'lookup'"):
        parse_sources("ngram,lookup")


def test_drafting_memory_keeps_a_curve_per_source(models):
    policy = DraftPolicy(4, 1, memory=drafting.DraftMemory())
    policy.accepted([0], 4, [4], [True], [NGRAM], [4])
    assert policy.memory.reached[4][NGRAM].tolist() == [1, 1, 1, 1] and not policy.memory.reached[4][MODEL].any()


def test_generation_settings_check_the_sources():
    from dllm.errors import UserError
    from dllm.generation import GenerationSettings

    assert GenerationSettings().draft_sources == "all"
    assert GenerationSettings(draft_sources="ngram").draft_sources == "ngram"
    with pytest.raises(UserError, match="model.generation.draft_sources: unknown source 'lookahead'"):
        GenerationSettings(draft_sources="lookahead")


# --- a model whose own drafts are right, beside plausible but wrong n-grams ---------------------------------

WORDS = list(range(10, 18))  # the text: random over 8 tokens, so every n-gram recurs with another continuation
NEUTRAL = 3  # read like a placeholder; what the model writes after a wrong drafted token
STOP = 2  # never written


def model_with_own_drafts_right(seed: int = 0, positions: int = 128, recovers: bool = True):
    """A GPT-2 whose next token is the true text's at that position, whatever came before.

    So its own drafts (after placeholders or its own guesses) are always right,
    as a trained model's converging drafts are, while the n-gram source finds
    the text's last n-gram earlier with another continuation: plausible, wrong.
    And a wrong drafted token (not the true one, a placeholder or ``NEUTRAL``)
    spoils the prediction after it (``NEUTRAL``): predictions past a rejected
    text candidate were conditioned on its wrong tokens. Built by hand: one
    layer, attention off, the position embedding picks the token, one MLP unit
    per position fires on a wrong token there.

    ``recovers=False``: ``NEUTRAL`` spoils the prediction after it too, so
    once a draft holds a wrong token the predictions after it stay ``NEUTRAL``
    forward after forward; only placeholders (or right tokens) reset them. That
    is the packed model of ``bench/quality.py``: trained to predict after
    placeholders, it confirmed nothing from a draft of its own guesses that were
    conditioned on a rejected n-gram (310 row-forwards confirming 0 of 15).
    """
    from transformers import GPT2Config, GPT2LMHeadModel

    vocab, hidden, spoil = 32, 168, 32 + positions
    truth = torch.tensor(WORDS)[
        torch.randint(len(WORDS), (positions + 1,), generator=torch.Generator().manual_seed(seed))
    ]
    config = GPT2Config(vocab_size=vocab, n_positions=positions, n_embd=hidden, n_layer=1, n_head=4,
                        tie_word_embeddings=False, eos_token_id=STOP, bos_token_id=STOP)  # fmt: skip
    model = GPT2LMHeadModel(config).double().eval()
    t = model.transformer
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.zero_()
        t.wte.weight[:, :vocab] = torch.eye(vocab) * 8
        t.wpe.weight[:, vocab:spoil] = torch.eye(positions) * 8
        for norm in (t.h[0].ln_1, t.h[0].ln_2, t.ln_f):
            norm.weight.fill_(1.0)
        fc, proj = t.h[0].mlp.c_fc.weight, t.h[0].mlp.c_proj.weight  # Conv1D: [in, out]
        for p in range(positions):  # unit p: position p holds a wrong token
            fc[vocab + p, p] = 1.0
            fc[[int(truth[p]), STOP] + ([NEUTRAL] if recovers else []), p] = -1.0
            t.h[0].mlp.c_fc.bias[p] = -4.0
            proj[p, spoil] = 2.0
            model.lm_head.weight[int(truth[p + 1]), vocab + p] = 1.0
        model.lm_head.weight[NEUTRAL, spoil] = 3.0
    return model, truth


def own_and_all_sources(model, ids, mask, adaptive: bool) -> dict[str, float]:
    """Tokens per forward with the model's own drafts (``none``) and with every source (``all``), each in a
    model's first call (nothing measured yet), every row checked against HF greedy."""
    tpf = {}
    for sources in ("none", "all"):
        drafting.forget()
        out = iterative_generate(
            model, ids, mask, eos_token_id=STOP, pad_token_id=0, add_eos_length=7, mode="jacobi",
            max_new_tokens=96, adaptive_draft=adaptive, draft_sources=sources, return_dict=True,
        )  # fmt: skip
        assert generated_rows(out, ids.size(1)) == hf_rows(model, ids, mask, 96)
        tpf[sources] = out.tokens_per_forward
    return tpf


@pytest.mark.parametrize("adaptive", [False, True])
def test_text_drafts_cost_a_model_with_right_drafts_nothing(adaptive, monkeypatch):
    """Every source on: tokens per forward within a few percent of the model's own drafts alone.

    The n-gram source offers a candidate at every forward (1-grams always
    recur), right about one time in eight per token, and a wrong candidate
    spoils the predictions after it. Before the fix this gave 2-3x the forwards.
    """
    monkeypatch.setattr(drafting.DraftPolicy, "cost", lambda self, size: 1.0 + 0.0 * size)  # drafts are free
    model, truth = model_with_own_drafts_right()
    ids = torch.stack([truth[:12], truth[:12]])
    ids[1, :4] = 0  # a left-padded second row (positions from the mask: the same truth, shifted)
    mask = (ids != 0).long()
    mask[0] = 1
    tpf = own_and_all_sources(model, ids, mask, adaptive)
    assert tpf["none"] > 4  # its own drafts confirm long runs (8 tokens, then 1 from a placeholder draft)
    assert tpf["all"] >= 0.95 * tpf["none"], tpf  # before: 0.69x (3.0 vs 4.36 at batch 1)


@pytest.mark.parametrize("adaptive", [False, True])
def test_text_drafts_cost_a_model_that_drafts_from_placeholders_nothing(adaptive, monkeypatch):
    """A batch's first call, every source on: tokens per forward within a few percent of its own drafts alone.

    The model's drafts are right after placeholders, but once a draft holds a
    wrong token its guesses stay wrong (``recovers=False``). Before, each row
    verified an n-gram at the prefill (the model's placeholder draft, worth
    nothing on the flat prior, lost to the text prior), the n-gram broke, and
    the spoilt predictions became drafts that never recovered: the first batch
    of 50 rows of the packed model took 1,227 forwards where its own drafts
    take 631; here 0.62x (fixed) and 0.72x (adaptive) the tokens per forward of
    ``none``. Now the model's draft is verified until it was measured at all.
    """
    monkeypatch.setattr(drafting.DraftPolicy, "cost", lambda self, size: 1.0 + 0.0 * size)  # drafts are free
    model, truth = model_with_own_drafts_right(recovers=False)
    # rows of 12, 10, 8 and 6 prompt tokens, left-padded: positions come from the mask, so each is the truth
    ids = torch.stack([torch.cat([torch.zeros(2 * row, dtype=torch.long), truth[: 12 - 2 * row]]) for row in range(4)])
    mask = (ids != 0).long()
    tpf = own_and_all_sources(model, ids, mask, adaptive)
    assert tpf["none"] > 4  # its own drafts confirm long runs
    assert tpf["all"] >= 0.95 * tpf["none"], tpf

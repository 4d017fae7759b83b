"""Continuous batching's joins and compaction: a row joining at every step, with prompts of different lengths, and
batches compacted (holes and padding dropped, ``dllm.generation.batch_merge.compact``) at every step, still give
exactly each request's alone-reference, token for token in float64."""

import pytest
import torch
from conftest import EOS
from generation_helpers import prompts
from test_generation_windows import windowed_model
from test_stepper import alone

from dllm.generation import stepper as stepper_module
from dllm.generation.batch import Batch
from dllm.generation.batch_merge import compact, holes
from dllm.generation.stepper import Stepper


def run_joining(stepper, requests, arrivals, after_step=None):
    """Admit request i at step arrivals[i]; {id: (tokens, reason)} and the step of each request's first event."""
    done, tokens, first, step = {}, {i: [] for i in range(len(requests))}, {}, 0
    while len(done) < len(requests):
        for i, at in enumerate(arrivals):
            if at == step:
                stepper.admit(i, **requests[i])
        for event in stepper.step():
            first.setdefault(event.id, step)
            tokens[event.id] += event.tokens
            if event.finish_reason:
                done[event.id] = (tokens[event.id], event.finish_reason)
        if after_step is not None:
            after_step(stepper)
        step += 1
        assert step < 500
    assert stepper.idle
    return done, first


def joining_requests(count=10, seed=2):
    lengths = [2 + (7 * i) % 13 for i in range(count)]  # 2 .. 14 tokens, no two neighbours alike
    ids, mask = prompts(lengths, seed=seed)
    texts = [row[m.bool()].tolist() for row, m in zip(ids, mask)]
    settings = [dict(temperature=0.8, top_p=0.9, seed=i) if i % 4 == 3 else dict() for i in range(count)]
    budgets = [9 + (5 * i) % 23 for i in range(count)]
    return [dict(prompt_ids=t, max_new_tokens=b, **s) for t, b, s in zip(texts, budgets, settings)], settings


def check_alone(model, requests, settings, got, **kw):
    for i, request in enumerate(requests):
        expected = alone(
            model, request["prompt_ids"], max_length=80, max_new_tokens=request["max_new_tokens"], **kw, **settings[i]
        )
        assert got[i] == expected, i


@pytest.mark.parametrize("arch", ["llama", "mistral-window"])
@pytest.mark.parametrize("mode,adaptive", [("jacobi", True), ("jacobi", False), ("refine", False)])
def test_a_row_joining_at_every_step_with_compaction_equals_alone(models, monkeypatch, arch, mode, adaptive):
    model = windowed_model("mistral") if arch == "mistral-window" else models[arch]
    requests, settings = joining_requests()
    kw = dict(mode=mode, add_eos_length=6, refine_iter=2, adaptive_draft=adaptive)
    stepper = Stepper(model, [EOS], max_length=80, max_rows=10, compact_share=0.0, **kw)
    compactions = []

    def compacted(s):  # every step leaves a batch as wide as its longest row's cached columns
        assert s.batch is None or holes(s.batch) == 0

    def counting(batch):
        compactions.append(holes(batch))
        compact(batch)

    monkeypatch.setattr(stepper_module, "compact", counting)
    got, first = run_joining(stepper, requests, arrivals=list(range(len(requests))), after_step=compacted)
    assert first == {i: i for i in range(len(requests))}  # each joined at the step it came
    if mode == "jacobi":  # jacobi holes really were compacted away (refine blocks leave none; trim does the rest)
        assert sum(d > 0 for d in compactions) >= 3
    check_alone(model, requests, settings, got, **kw)


def test_compact_moves_columns_without_changing_the_logits(models):
    """Holes and padding dropped: the next forward's logits are the same, the batch narrower."""
    model = models["llama"]
    ids, mask = prompts([3, 9, 6], seed=4)

    def holey_batch():
        batch = Batch(model, ids, mask, use_cache=True)
        gen = torch.Generator().manual_seed(0)
        for accepted in ([3, 0, 1], [0, 2, 4], [1, 1, 0]):  # rows confirm different counts: holes
            draft = torch.randint(3, 40, (3, 4), generator=gen)
            batch.forward(draft)
            start = batch.width
            batch.commit_draft(max(accepted), torch.tensor(accepted))
            batch.commit(torch.randint(3, 40, (3, 1), generator=gen))
            batch.rollback(start + max(accepted))
        return batch

    plain, compacted = holey_batch(), holey_batch()
    assert holes(compacted) > 0
    compact(compacted)
    assert holes(compacted) == 0 and compacted.width < plain.width
    assert compacted.width - compacted.cached == plain.width - plain.cached  # the uncached tail stays
    draft = torch.tensor([[5, 6], [7, 8], [9, 10]])
    torch.testing.assert_close(compacted.forward(draft), plain.forward(draft), rtol=1e-12, atol=1e-12)
    a, b = compacted, plain
    for row in range(3):  # each row's real tokens and positions, in order, are the same
        real_a, real_b = a._mask[row, : a.width].bool(), b._mask[row, : b.width].bool()
        assert a._ids[row, : a.width][real_a].tolist() == b._ids[row, : b.width][real_b].tolist()
        assert a._pos[row, : a.width][real_a].tolist() == b._pos[row, : b.width][real_b].tolist()


def test_a_negative_compact_share_is_refused(models):
    with pytest.raises(ValueError, match="compact_share"):
        Stepper(models["llama"], [EOS], compact_share=-0.5)

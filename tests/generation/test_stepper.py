"""The step-wise engine (``dllm.generation.stepper``): rows admitted at any step give exactly their alone-reference."""

import pytest
import torch
from conftest import EOS
from generation_helpers import generated_rows, prompts

from dllm import iterative_generate
from dllm.generation.stepper import Stepper


def alone(model, prompt, **kw):
    ids = torch.tensor([prompt])
    seed = kw.pop("seed", None)
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    out = iterative_generate(model, ids, eos_token_id=EOS, generator=generator, return_dict=True, **kw)
    return generated_rows(out, ids.size(1))[0], out.finish_reason[0]


def run_staggered(stepper, requests, arrivals):
    """Admit request i at step arrivals[i]; run until all are done: {id: (tokens, reason)}."""
    done, tokens, step = {}, {i: [] for i in range(len(requests))}, 0
    while len(done) < len(requests):
        for i, at in enumerate(arrivals):
            if at == step:
                stepper.admit(i, **requests[i])
        for event in stepper.step():
            tokens[event.id] += event.tokens
            if event.finish_reason:
                done[event.id] = (tokens[event.id], event.finish_reason)
        step += 1
        assert step < 500
    assert stepper.idle
    return done


@pytest.mark.parametrize("arch", ["llama", "mistral"])
@pytest.mark.parametrize("mode", ["jacobi", "refine"])
def test_staggered_rows_equal_alone(models, arch, mode):
    model = models[arch]
    ids, mask = prompts([5, 9, 3, 12, 7, 4, 8, 6], seed=1)
    texts = [row[m.bool()].tolist() for row, m in zip(ids, mask)]
    sampled = [dict(temperature=0.9, top_p=0.9, seed=s) for s in (3, 4)]
    settings = [dict(), dict(), *sampled, dict(temperature=1.3, top_k=5, seed=7), dict(), dict(), dict()]
    budgets = [30, 12, 25, 40, 17, 33, 2, 21]
    requests = [dict(prompt_ids=t, max_new_tokens=b, **s) for t, b, s in zip(texts, budgets, settings)]
    stepper = Stepper(model, [EOS], mode=mode, add_eos_length=6, refine_iter=3, max_length=60, max_rows=4)
    got = run_staggered(stepper, requests, arrivals=[0, 0, 1, 2, 2, 5, 9, 11])
    for i, request in enumerate(requests):
        expected = alone(
            model, request["prompt_ids"], mode=mode, add_eos_length=6, refine_iter=3, max_length=60,
            max_new_tokens=request["max_new_tokens"], **settings[i],
        )  # fmt: skip
        assert got[i] == expected, i


def test_static_batching_waits_for_the_batch(models):
    stepper = Stepper(models["llama"], [EOS], static=True, max_rows=4, add_eos_length=4)
    stepper.admit("a", [5, 6, 7], max_new_tokens=6)
    stepper.step()
    stepper.admit("b", [8, 9], max_new_tokens=3)
    seen = []
    while not stepper.idle:
        seen.append({e.id for e in stepper.step()})
    first_b = next(i for i, ids in enumerate(seen) if "b" in ids)
    assert all("a" not in ids for ids in seen[first_b:])  # b started only after a was done


def test_cancel_frees_the_slot(models):
    model = models["llama"]
    stepper = Stepper(model, [EOS], max_rows=1, add_eos_length=4)
    stepper.admit("a", [5, 6, 7], max_new_tokens=50)
    stepper.admit("b", [8, 9], max_new_tokens=5)
    assert [e.id for e in stepper.step()] == ["a"]
    assert stepper.running == 1 and len(stepper.waiting) == 1
    stepper.cancel("a")
    events = stepper.step()
    assert [(e.id, e.finish_reason) for e in events][0] == ("a", "cancelled")
    assert stepper.running == 1 and not stepper.waiting  # b took the freed slot at once
    tokens = [t for e in events if e.id == "b" for t in e.tokens]
    while not stepper.idle:
        tokens += [t for e in stepper.step() if e.id == "b" for t in e.tokens]
    assert tokens == alone(model, [8, 9], mode="jacobi", add_eos_length=4, max_new_tokens=5)[0]

"""Adaptive jacobi drafts: the length follows acceptance and cost; the tokens never change."""

import numpy as np
import pytest
import torch
from conftest import ARCHS, EOS
from generation_helpers import hf_greedy, prompts

import dllm.generation.drafting as drafting
from dllm import iterative_generate
from dllm.generation.drafting import DraftPolicy


def calibrated(max_draft: int, rows: int, times: dict[int, float]) -> DraftPolicy:
    """A policy past its calibration steps, with given step times per forward size."""
    policy = DraftPolicy(max_draft, rows)
    policy.steps = 3
    for size, seconds in times.items():
        policy.record(size, seconds)
    return policy


def set_model_rates(policy: DraftPolicy, hits: list[float], trials: list[float]) -> None:
    """Give each row's model-source drafts ``trials`` forwards of evidence that a draft token is confirmed
    with chance ``hits / trials`` at every position (a geometric survival curve)."""
    for row, (h, t) in enumerate(zip(hits, trials)):
        policy.reached[row, drafting.MODEL] = t
        policy.rejected[row, drafting.MODEL] = t - h


def test_dear_drafts_that_are_rarely_right_are_not_drafted():
    policy = calibrated(7, 1, {1: 1.0, 8: 1.7})  # an 8-token forward costs 1.7 one-token forwards
    set_model_rates(policy, [0.5], [20.0])  # ~5% of draft tokens confirmed
    assert policy.choose([0], [100]) == 0


def test_cheap_drafts_that_are_right_are_drafted_long():
    policy = calibrated(7, 1, {1: 1.0, 8: 1.05})
    set_model_rates(policy, [18.0], [20.0])
    assert policy.choose([0], [100]) == 7
    assert policy.choose([0], [4]) == 3  # never past the budget


def steady_confirmed(k: int, rate: float) -> float:
    """Confirmed tokens per forward when every forward drafts ``k`` of the model's own tokens at a geometric
    ``rate``: a forward that confirms ``a`` leaves ``k - a`` guesses for the next, so ``a = E(k - a)``,
    ``E(g) = rate + ... + rate**g`` (linear between whole ``g``), solved by bisection."""

    def confirmed(g: float) -> float:
        whole = int(g)
        return sum(rate**i for i in range(1, whole + 1)) + (g - whole) * rate ** (whole + 1)

    lo, hi = 0.0, float(k)
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if confirmed(k - mid) > mid else (lo, mid)
    return lo


def test_the_length_balances_acceptance_against_cost():
    """Cost linear in the tokens of the forward: at a 60% rate the best draft is short but not zero."""
    policy = calibrated(15, 1, {1: 1.0, 16: 2.5})  # +0.1 per draft token
    set_model_rates(policy, [12.0], [20.0])
    k = policy.choose([0], [100])
    speeds = {j: (1 + steady_confirmed(j, 0.6)) / (1 + 0.1 * j) for j in range(16)}
    assert 1 <= k <= 6 and speeds[k] >= max(speeds.values()) / (1 + drafting.LONGER)  # near-ties go longer


def test_placeholders_past_the_guesses_are_not_counted_as_rejected_guesses():
    """A draft of 8 with 2 guesses (the rest placeholders) that confirms both says nothing of positions 3-8.

    Counted as a rejection at position 3, it made the model's curve end where the last draft's guesses did,
    and a short draft (few guesses next time) looked like the model's limit: the recipe model of
    bench/quality.py settled on 5-6 tokens where 15 were 40% faster.
    """
    censored, counted = calibrated(8, 1, {1: 1.0, 9: 1.0}), calibrated(8, 1, {1: 1.0, 9: 1.0})
    for _ in range(20):
        censored.accepted([0], 8, [2], [True], guesses=[2])
        counted.accepted([0], 8, [2], [True])
    assert counted.rejected[0, drafting.MODEL, 2] > 5  # position 3 (index 2): a "rejection" each forward (faded)
    assert censored.rejected[0, drafting.MODEL].sum() == 0 and censored.reached[0, drafting.MODEL, 2] == 0
    assert censored.expected([0])[0, drafting.MODEL, 8] > counted.expected([0])[0, drafting.MODEL, 8] + 0.5


def test_a_draft_that_leaves_guesses_for_the_next_forward_is_worth_its_width():
    """Free columns and every guess right: the steady state of drafting k confirms about k / 2 per forward
    (half the draft is the guesses the last forward left), and the longest draft is chosen."""
    policy = calibrated(15, 1, {1: 1.0, 16: 1.0})
    set_model_rates(policy, [1000.0], [1000.0])
    expected = policy.expected([0])[:, drafting.MODEL]
    ks = np.array([[3, 7, 15]])
    assert drafting.steady(expected, ks) == pytest.approx(np.array([[1.5, 3.5, 7.5]]), abs=0.05)
    assert policy.choose([0], [100]) == 15


def test_a_batch_drafts_for_its_slowest_row():
    """The batch ends when its slowest row does: drafting that only helps a fast row is not worth a dearer forward."""
    costs = {2: 1.0, 16: 1.3}
    mixed = calibrated(7, 2, costs)
    set_model_rates(mixed, [19.0, 0.0], [20.0, 20.0])  # one row always right, one never
    assert mixed.choose([0, 1], [50, 50]) == 0
    both = calibrated(7, 2, costs)
    set_model_rates(both, [19.0, 15.0], [20.0, 20.0])
    assert both.choose([0, 1], [50, 50]) > 0


def test_a_silent_row_drifts_back_to_trying():
    policy = calibrated(7, 1, {1: 1.0, 8: 1.3})
    set_model_rates(policy, [0.0], [20.0])
    assert policy.choose([0], [500]) == 0
    for _ in range(300):  # forwards without a draft: the evidence fades toward the prior
        policy.accepted([0], 0, [0], [False])
    decisions = [policy.choose([0], [500]) for _ in range(drafting.HOLD)]  # past the standing decision
    assert decisions[-1] > 0


def test_costs_are_interpolated_between_measured_sizes():
    policy = calibrated(7, 1, {1: 1.0, 8: 2.4})
    assert policy.cost(1) == 1.0 and policy.cost(8) == 2.4
    assert policy.cost(4) == pytest.approx(1.6)
    assert policy.cost(16) == pytest.approx(4.0)  # beyond: the same slope


def test_step_times_come_from_the_clock():
    now = iter([0.0, 1.0, 1.5, 3.5, 4.0, 5.0]).__next__
    policy = DraftPolicy(3, 1, clock=now)
    policy.started(4, timed=False)  # the prefill
    policy.finished()
    for size in (4, 1, 4):
        policy.started(size)
        policy.finished()
    assert {size: list(t) for size, t in policy.times.items()} == {4: [1.0, 1.0], 1: [2.0]}


def cost_model(per_token: float):
    """A deterministic stand-in for the measured step time: 1 + per_token x (tokens - 1)."""
    return lambda self, size: 1.0 + per_token * (size - 1)


@pytest.mark.parametrize("arch", ARCHS)
def test_dear_forwards_fall_back_to_one_token_decoding_exactly(models, arch, monkeypatch):
    monkeypatch.setattr(drafting.DraftPolicy, "cost", cost_model(per_token=1.0))  # compute-bound
    model = models[arch]
    ids, mask = prompts([6, 2, 11])
    out = iterative_generate(
        model, ids, mask, eos_token_id=EOS, pad_token_id=0, add_eos_length=7, mode="jacobi", max_new_tokens=30,
        return_dict=True,
    )  # fmt: skip
    assert torch.equal(out.sequences, hf_greedy(model, ids, mask, 30))
    assert out.num_forwards <= 30  # one token per forward after the two calibration steps


@pytest.mark.parametrize("arch", ARCHS)
def test_free_drafts_are_drafted_in_full_exactly(models, arch, monkeypatch):
    monkeypatch.setattr(drafting.DraftPolicy, "cost", cost_model(per_token=0.0))  # overhead-bound
    model = models[arch]
    ids, mask = prompts([4])
    steps = []
    out = iterative_generate(
        model, ids, mask, eos_token_id=EOS, add_eos_length=5, mode="jacobi", max_new_tokens=60, return_dict=True,
        trace=steps.append,
    )  # fmt: skip
    assert torch.equal(out.sequences, hf_greedy(model, ids, mask, 60))
    done, longest = 0, []  # the longest draft the budget allows at each step
    for step in steps:
        longest.append(min(5, 60 - done - 1))
        done += step.accepted + 1
    lengths = [len(s.draft) for s in steps]
    assert lengths[:3] == [3, 5, 0]  # calibration: the prefill's short draft, then the cost of the longest and of none
    # free drafts: all or nothing (nothing only while the row's rate cannot promise the margin)
    assert all(k in (0, most) for k, most in zip(lengths[3:], longest[3:]))
    assert lengths.count(5) > len(lengths) // 2  # mostly the longest


def test_a_later_call_on_the_same_model_skips_the_calibration(models, monkeypatch):
    """What a call measured (step times, the model's acceptance) carries over; the tokens never change."""
    monkeypatch.setattr(drafting.DraftPolicy, "cost", cost_model(per_token=0.0))  # overhead-bound
    model = models["llama"]
    ids, mask = prompts([4])
    expected = hf_greedy(model, ids, mask, 40)
    calls = []
    for _ in range(2):
        steps = []
        out = iterative_generate(
            model, ids, mask, eos_token_id=EOS, add_eos_length=5, mode="jacobi", max_new_tokens=40, return_dict=True,
            trace=steps.append,
        )  # fmt: skip
        assert torch.equal(out.sequences, expected)
        calls.append([len(s.draft) for s in steps])
    assert calls[0][:3] == [3, 5, 0]  # calibration: a short draft, then the cost of the longest and of none
    assert calls[1][0] == 5  # calibrated: free drafts are drafted in full from the first forward
    drafting.forget()
    steps = []
    iterative_generate(model, ids, mask, eos_token_id=EOS, add_eos_length=5, mode="jacobi", max_new_tokens=40,
                       trace=steps.append)  # fmt: skip
    assert [len(s.draft) for s in steps][:3] == [3, 5, 0]


def test_the_memory_is_per_model_device_and_dtype(models):
    model = models["qwen2"]
    memory = drafting.memory_of(model, torch.device("cpu"), torch.float64)
    assert drafting.memory_of(model, torch.device("cpu"), torch.float64) is memory
    assert drafting.memory_of(models["llama"], torch.device("cpu"), torch.float64) is not memory
    assert drafting.memory_of(model, torch.device("cpu"), torch.float32) is not memory


class AbsurdClock:
    """A step clock: a drafted step costs 1 + 1% per column, except at ``absurd`` steps, which take 1000 s.

    The policy reads the clock when a step starts (``_last`` is then unset)
    and when it finishes; the finish advances time by the step's cost.
    """

    def __init__(self, policy: DraftPolicy, absurd: range):
        self.policy, self.absurd, self.now = policy, absurd, 0.0

    def __call__(self) -> float:
        last = self.policy._last
        if last is not None:
            drafted = last[0] > 1
            self.now += 1000.0 if drafted and self.policy.steps in self.absurd else 1.0 + 0.01 * last[0]
        return self.now


@pytest.mark.parametrize("absurd", [range(2, 3), range(5, 30)], ids=["at-the-start", "in-the-middle"])
def test_absurd_step_times_do_not_lock_drafting_out(absurd, monkeypatch):
    """Stalls during drafted steps make drafts look 1000x dearer; the policy drafts again within a few
    forwards of the last stall, in that call and the next (which inherits the stalls in its memory)."""
    from test_generation_sources import STOP, model_with_own_drafts_right

    model, truth = model_with_own_drafts_right()
    ids = truth[None, :12]
    original = DraftPolicy.__init__
    clocks = iter([lambda policy: AbsurdClock(policy, absurd), lambda policy: AbsurdClock(policy, range(0))])

    def init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        self.clock = next(clocks)(self)

    monkeypatch.setattr(DraftPolicy, "__init__", init)
    drafting.forget()
    bound = 12  # forwards: a probe (every 8 without a draft), and the decisions around it
    for call in range(2):
        steps = []
        out = iterative_generate(
            model, ids, eos_token_id=STOP, add_eos_length=7, mode="jacobi", max_new_tokens=100,
            draft_sources="none", trace=steps.append, return_dict=True,
        )  # fmt: skip
        assert torch.equal(out.sequences, hf_greedy(model, ids, None, 100))
        drafts = [len(s.draft) for s in steps]
        start = absurd.stop if call == 0 else 0  # the last stall of the first call; the next starts clean
        assert any(drafts[start : start + bound]), (call, drafts)
        assert out.tokens_per_forward > 2.0, (call, str(drafts))  # and drafting is not given up again


def test_a_rarely_measured_size_does_not_outprice_its_well_measured_neighbours():
    """One typical time of a size the policy seldom drafts must not make it dearer than a wider size it keeps
    drafting (recipe model, batch 50: 724 columns on 3 samples at 12.6 ms, 790 on 16 at 10.5 ms)."""
    policy = calibrated(15, 50, {})
    for size, seconds, samples in ((400, 7.5, 16), (600, 9.0, 16), (724, 12.6, 1), (800, 10.5, 16)):
        for _ in range(samples):
            policy.record(size, seconds)
    sizes = np.arange(50, 801, 25)
    costs = policy.cost(sizes)
    assert np.all(np.diff(costs) >= 0)  # a wider forward never costs less
    assert policy.cost(724) < 10.5 and policy.cost(800) > policy.cost(600) + 1.0  # the lone time is outvoted


def test_a_decision_stands_for_hold_forwards():
    """Deciding costs a tenth of a tiny model's step: with the same rows and only the model's drafts, the
    length is decided once per HOLD forwards, and at once again after a step took twice its estimate."""
    policy = calibrated(7, 1, {1: 1.0, 8: 1.05})
    set_model_rates(policy, [18.0], [20.0])
    decided = []
    original = policy._decide
    policy._decide = lambda *args, **kwargs: decided.append(1) or original(*args, **kwargs)
    policy._probe_every = 10**6  # no probe in this test
    ks = [policy.choose([0], [100]) for _ in range(drafting.HOLD)]
    assert ks == [7] * drafting.HOLD and len(decided) == 1
    policy.clock = iter([0.0, 100.0]).__next__  # the next step takes 100 s
    policy.started(8)
    policy.finished()
    policy.choose([0], [100])
    assert len(decided) == 2


def test_a_no_draft_step_timed_slow_once_is_timed_again():
    """The probe the other way round: a policy that keeps drafting never times a one-column step again, so one
    slow time of it makes drafting look free (bench/quality.py's sft model: adaptive at 83% of fixed N=3).
    A probe re-times it (at most RETIME times), and then the policy stops drafting drafts that do not pay."""
    policy = calibrated(7, 1, {1: 1.5})  # one slow no-draft time (a calibration step)
    for _ in range(16):
        policy.record(8, 1.35)  # the drafted steps it keeps choosing
    set_model_rates(policy, [2.0], [20.0])  # 10% of draft tokens confirmed
    assert policy.choose([0], [1000]) > 0  # drafting looks free: cost(1) is pooled up to cost(8)
    ks = []
    for _ in range(8 * drafting.PROBE_EVERY):
        k = policy.choose([0], [1000])
        ks.append(k)
        policy.record(k + 1, 0.9 if k == 0 else 1.35)  # what the steps really cost
    assert policy.costs.samples(1) >= drafting.RETIME  # no draft was timed again ...
    late = ks[len(ks) // 2 :]
    assert late.count(0) >= 0.9 * len(late), ks  # ... and the policy stopped drafting (but for the probes)
    retimed = sum(1 for a, b in zip(ks, ks[1:]) if a > 0 and b == 0)
    assert retimed <= drafting.RETIME + 1

"""Continuous batching without HTTP: a server's arrival pattern driven straight into a ``Stepper``, profiled.

``bench/serving.py`` measures whole servers, whose wall time on a shared machine
swings by 2x between runs, and whose clients, HTTP and SSE share the cores with
the model. This driver runs the engine's part alone, in one process and one
thread, and reports what does not depend on load: forwards per kind (the
newcomers' prefills, the running batch's steps), rows, columns and attended
width per forward, tokens per forward, and the process CPU time of each part of
a step (the model's forwards, merging, trimming and compacting rows, the draft
policy and sources, the per-row bookkeeping, detokenization), each part's own
time without the parts it calls.

Methods (``--methods``, each run with every ``--compact`` share, interleaved over
``--repeat`` runs): ``continuous`` and ``static`` batching. The adaptive draft
length follows measured step times, so its forwards differ from run to run;
``--fixed-draft`` (always the longest draft) makes the counts repeat exactly.

Arrivals: ``--clients C``: C clients back to back (a finished request's client
sends its next one before the next step); ``--rate R``: Poisson arrivals, R
requests per second of the driver's CPU clock (an idle engine skips ahead to the
next arrival). Every answer is checked against the first method's.

    python bench/stepper_load.py --ckpt bench/results/quality/sft-recipe/model.ckpt \
        --prompts bench/results/quality/test.jsonl --clients 16 --requests 96 --repeat 3 --fixed-draft
    python bench/stepper_load.py --model models/smollm2-135m --prompts prompts.jsonl --rate 40 \
        --methods continuous --compact 0.1
    python bench/stepper_load.py --model models/smollm2-135m --forward-costs  # what fusing a prefill would cost
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.serving import load_prompts, prepare_model  # noqa: E402
from dllm.generation import batch_merge, stepper_steps  # noqa: E402
from dllm.generation import stepper as stepper_module  # noqa: E402
from dllm.generation.batch import Batch  # noqa: E402
from dllm.generation.draft_sources import DraftSources  # noqa: E402
from dllm.generation.drafting import DraftPolicy  # noqa: E402
from dllm.serving.stream import TextStream  # noqa: E402


class Profile:
    """Own CPU time (children excluded) and calls per named part; forwards per kind.

    ``clock``: ``time.process_time`` in this one-thread driver; ``time.thread_time`` inside a server,
    whose other threads (HTTP) must not count.
    """

    def __init__(self, clock=time.process_time):
        self.clock = clock
        self.own, self.calls, self._stack = defaultdict(float), defaultdict(int), []
        self.forwards, self.rows, self.columns, self.tokens = defaultdict(int), [], [], defaultdict(int)
        self.kind, self.kinds, self.widths = "step", [], []

    def timed(self, name, fn):
        def wrapper(*args, **kwargs):
            start = self.clock()
            self._stack.append(0.0)
            try:
                return fn(*args, **kwargs)
            finally:
                elapsed = self.clock() - start
                children = self._stack.pop()
                self.own[name] += elapsed - children
                self.calls[name] += 1
                if self._stack:
                    self._stack[-1] += elapsed

        return wrapper

    def install(self):
        """Wrap the parts of a step (this process only); returns a function that undoes it."""
        undo = []

        def wrap(owner, attr, name):
            original = getattr(owner, attr)
            undo.append((owner, attr, original))
            setattr(owner, attr, self.timed(name, original))

        forward = Batch.forward
        by_kind = {}

        def counted(batch, draft, *args, **kwargs):
            self.forwards[self.kind] += 1
            self.rows.append(len(batch.rows))
            self.columns.append(batch.width - batch.cached + draft.size(1))
            self.kinds.append(self.kind)
            self.widths.append(batch.width + draft.size(1))
            if self.kind not in by_kind:
                by_kind[self.kind] = self.timed(f"model forward ({self.kind})", forward)
            return by_kind[self.kind](batch, draft, *args, **kwargs)

        undo.append((Batch, "forward", forward))
        Batch.forward = counted
        for owner, attr, name in [
            (stepper_module.Stepper, "step", "step (rest)"),
            (stepper_module.Stepper, "_admit_waiting", "admit"),
            (stepper_module.Stepper, "_drop_cancelled", "cancel"),
            (stepper_module.Stepper, "_keep", "retire rows"),
            (stepper_module.Stepper, "_reset_slot", "admit"),
            (stepper_module, "merge", "merge"),
            (stepper_module, "trim", "trim"),
            (stepper_module, "compact", "compact"),
            (batch_merge, "merge", "merge"),
            (DraftPolicy, "pick", "draft policy"),
            (DraftPolicy, "choose", "draft policy"),
            (DraftPolicy, "accepted", "draft policy"),
            (DraftPolicy, "started", "draft policy"),
            (DraftPolicy, "finished", "draft policy"),
            (DraftSources, "offers", "draft sources"),
            (stepper_steps, "_observe", "draft sources"),
            (stepper_steps, "accept", "accept"),
            (stepper_steps, "_next_drafts", "next drafts"),
            (stepper_steps, "forward_and_pick", "pick tokens"),
            (Batch, "keep", "retire rows"),
            (Batch, "commit", "commit"),
            (Batch, "commit_draft", "commit"),
            (Batch, "rollback", "commit"),
            (Batch, "_masks", "masks"),
            (TextStream, "push", "detokenize"),
        ]:
            if hasattr(owner, attr):
                wrap(owner, attr, name)
        if hasattr(stepper_module.Stepper, "_advance"):  # the kind of forward: a prefill or a step
            advance = stepper_module.Stepper._advance

            def kinded(stepper, batch, prefill, *args, **kwargs):
                self.kind = "prefill" if prefill else "step"
                try:
                    return advance(stepper, batch, prefill, *args, **kwargs)
                finally:
                    self.kind = "step"

            undo.append((stepper_module.Stepper, "_advance", advance))
            stepper_module.Stepper._advance = kinded

        def restore():
            for owner, attr, original in reversed(undo):
                setattr(owner, attr, original)

        return restore


def drive(stepper, prompts, tokenizer, stop_ids, args, profile: Profile) -> dict:
    """Serve every prompt with the arrival pattern of ``args``; answers and counters."""
    order = list(range(len(prompts)))
    arrivals = []
    if args.rate:
        rng, t = random.Random(args.seed), 0.0
        for _ in order:
            arrivals.append(t)
            t += rng.expovariate(args.rate)
    answers, streams, tokens = {}, {}, defaultdict(list)
    queue, next_up, in_flight = list(order), 0, 0
    clock_offset, busy = 0.0, 0.0
    start = time.process_time()
    steps = 0
    while len(answers) < len(prompts):
        now = time.process_time() - start + clock_offset
        if args.rate:
            if stepper.idle and next_up < len(queue) and arrivals[next_up] > now:
                clock_offset += arrivals[next_up] - now  # nothing to do until the next request comes
                now = arrivals[next_up]
            while next_up < len(queue) and arrivals[next_up] <= now:
                i = queue[next_up]
                stepper.admit(i, prompts[i], args.max_tokens)
                streams[i] = TextStream(tokenizer, stop_ids)
                next_up += 1
        else:
            while in_flight < args.clients and next_up < len(queue):
                i = queue[next_up]
                stepper.admit(i, prompts[i], args.max_tokens)
                streams[i] = TextStream(tokenizer, stop_ids)
                next_up, in_flight = next_up + 1, in_flight + 1
        if stepper.idle:
            continue
        t0 = time.process_time()
        events = stepper.step()
        steps += 1
        for event in events:  # what the server's engine does with a step's events: text deltas
            tokens[event.id] += event.tokens
            streams[event.id].push(event.tokens, last=event.finish_reason is not None)
            if event.finish_reason is not None:
                answers[event.id] = tokens[event.id]
                in_flight -= 1
        busy += time.process_time() - t0
    generated = sum(len(a) for a in answers.values())
    return {"answers": answers, "busy": busy, "steps": steps, "tokens": generated}


def report(name: str, result: dict, profile: Profile) -> str:
    forwards = sum(profile.forwards.values())
    busy = result["busy"]
    lines = [
        f"## {name}",
        f"steps {result['steps']}, forwards {forwards} ({dict(profile.forwards)}), tokens {result['tokens']}, "
        f"tokens per forward {result['tokens'] / forwards:.2f}, rows per forward "
        f"{sum(profile.rows) / forwards:.1f}, columns per forward {sum(profile.columns) / forwards:.1f}, "
        f"row x columns per forward {sum(r * c for r, c in zip(profile.rows, profile.columns)) / forwards:.0f}",
        f"busy CPU {busy:.3f} s, {result['tokens'] / busy:.0f} tokens per CPU second",
    ]
    for kind in profile.forwards:
        shape = [s for k, *s in zip(profile.kinds, profile.rows, profile.columns, profile.widths) if k == kind]
        rows, columns, width = (sum(x) / len(shape) for x in zip(*shape))
        area = sum(r * c for r, c, _ in shape) / len(shape)
        lines.append(
            f"{kind} forwards: {len(shape)}, rows {rows:.1f}, columns {columns:.1f}, rows x columns {area:.0f}, "
            f"attended width {width:.0f}"
        )
    lines += [
        "| part | CPU s | share | calls | ms per call |",
        "|---|---:|---:|---:|---:|",
    ]
    for part, seconds in sorted(profile.own.items(), key=lambda kv: -kv[1]):
        calls = profile.calls[part]
        lines.append(
            f"| {part} | {seconds:.3f} | {100 * seconds / busy:.0f}% | {calls} | {1000 * seconds / calls:.2f} |"
        )
    return "\n".join(lines)


def forward_costs(model, reps: int = 60) -> None:
    """CPU time of forwards shaped like a step, a newcomers' prefill, and one forward fusing both (the newcomers'
    prompt as the query columns of every row: a forward is a rectangle): what fusing the prefill would cost."""
    gen = torch.Generator().manual_seed(0)

    def cost(rows, cached, query):
        width = cached + 1
        ids = torch.randint(3, model.config.vocab_size, (rows, width), generator=gen)
        mask = torch.ones_like(ids)
        mask[:, : width // 3] = 0  # padding and holes: a 4-D mask, as in a merged batch
        batch = Batch(model, ids, mask, use_cache=True)
        times = []
        with torch.inference_mode():
            batch.forward(ids.new_zeros(rows, 0))
            batch.rollback(width - 1)
            batch.cached = width - 1 if cached else 0
            for _ in range(reps):
                draft = torch.randint(3, model.config.vocab_size, (rows, query - 1), generator=gen)
                start = time.process_time()
                batch.forward(draft)
                times.append(time.process_time() - start)
                batch.rollback(width - 1)
        return 1000 * sorted(times)[reps // 4]

    for label, rows, cached, query in [
        ("step: 15 rows x 4 columns, 150 cached", 15, 150, 4),
        ("step: 13 rows x 16 columns, 150 cached", 13, 150, 16),
        ("prefill: 2 rows x 28 columns, none cached", 2, 0, 28),
        ("fused: 17 rows x 32 columns, 150 cached", 17, 150, 32),
    ]:
        print(f"{label}: {cost(rows, cached, query):.2f} ms (25th percentile of {reps}, process CPU)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="models/smollm2-135m", help="HF folder")
    parser.add_argument("--ckpt", default=None, help="a Lightning checkpoint instead (exported to HF first)")
    parser.add_argument("--prompts", default=None, help="a JSONL file with 'prompt'")
    parser.add_argument("--requests", type=int, default=96)
    parser.add_argument("--clients", type=int, default=16, help="closed loop: this many clients back to back")
    parser.add_argument("--rate", type=float, default=0.0, help="open loop instead: Poisson, requests per CPU second")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--block", type=int, default=15)
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--fixed-draft", action="store_true", help="no adaptive draft length: counts repeat exactly")
    parser.add_argument("--compact", default="1,0.1", help="comma list: runs with each compact_share (1: never)")
    parser.add_argument("--methods", default="continuous,static", help="comma list of continuous / static")
    parser.add_argument("--repeat", type=int, default=1, help="runs of each method, interleaved")
    parser.add_argument("--json", default=None, help="also write the counters here")
    parser.add_argument("--forward-costs", action="store_true", help="only time forwards of a step's shapes")
    args = parser.parse_args()
    torch.set_num_threads(1)
    from dllm.module import DLLMModule

    folder = prepare_model(args)
    texts = load_prompts(args, folder)
    module = DLLMModule(pretrained=folder)
    model, tokenizer = module.model.eval(), module.tokenizer
    if args.forward_costs:
        return forward_costs(model)
    prompts = [tokenizer(t, add_special_tokens=False).input_ids for t in texts]
    reference, out = None, []
    for run in range(args.repeat):
        methods = [f"{m}@{c}" for m in args.methods.split(",") for c in args.compact.split(",")]
        for method in methods:
            profile = Profile()
            restore = profile.install()
            try:
                stepper = stepper_module.Stepper(
                    model, module.stop_ids, mode="jacobi", add_eos_length=args.block, max_length=args.max_length,
                    max_rows=args.rows, static=method.startswith("static"), adaptive_draft=not args.fixed_draft,
                    compact_share=float(method.split("@")[1]),
                )  # fmt: skip
                result = drive(stepper, prompts, tokenizer, module.stop_ids, args, profile)
            finally:
                restore()
            answers = [result["answers"][i] for i in range(len(prompts))]
            if reference is None:
                reference = answers
            same = sum(a == b for a, b in zip(answers, reference))
            print(report(f"{method} (run {run + 1})", result, profile), flush=True)
            print(f"answers identical to the first run's: {same}/{len(prompts)}\n", flush=True)
            out.append({"method": method, "run": run, "busy": result["busy"], "steps": result["steps"],
                        "tokens": result["tokens"], "forwards": dict(profile.forwards),
                        "own": dict(profile.own), "calls": dict(profile.calls)})  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()

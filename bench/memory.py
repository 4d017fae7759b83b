"""Peak memory of the training loss with a large vocabulary: naive vs chunked LM head.

The naive path materialises the model's ``[B, T, V]`` logits (plus an fp32 copy
for the cross-entropy); the chunked path (``loss_chunk_size``) projects only the
response positions, a chunk at a time, and recomputes each chunk in backward.
Each variant runs in its own process so the peaks do not mix.

    python bench/memory.py                      # CPU: peak RSS
    python bench/memory.py --device cuda        # GPU: torch.cuda.max_memory_allocated
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def measure(args: argparse.Namespace, chunk: int | None) -> dict:
    """One forward + backward of the objective; returns peak memory and the loss."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from dllm.training.objective import iterative_refine_loss

    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=args.vocab_size, hidden_size=args.hidden_size, intermediate_size=2 * args.hidden_size,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=True,
    )  # fmt: skip
    model = Qwen2ForCausalLM(config).to(args.device)
    ids = torch.randint(3, args.vocab_size, (args.batch, args.length), device=args.device)
    attention = torch.ones_like(ids)
    response = torch.zeros_like(ids)
    response[:, args.length // 4 :] = 1  # the last three quarters are the response
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    out = iterative_refine_loss(
        model, ids, attention, response, eos_token_id=1, num_rounds=2, loss_chunk_size=chunk,
        generator=torch.Generator(args.device).manual_seed(0),
    )  # fmt: skip
    out.loss.backward()
    seconds = time.perf_counter() - start
    if args.device == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:  # ru_maxrss is in KiB on Linux; the growth over the set-up is what the loss costs
        peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base_rss) / 1024
    return {"chunk": chunk, "peak_mib": round(peak, 1), "loss": out.loss.item(), "seconds": round(seconds, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab-size", type=int, default=150_000, help="vocabulary size (Qwen-like: 150k)")
    parser.add_argument("--hidden-size", type=int, default=64, help="model width")
    parser.add_argument("--batch", type=int, default=4, help="rows per batch")
    parser.add_argument("--length", type=int, default=512, help="tokens per row")
    parser.add_argument("--chunk", type=int, default=256, help="LM-head positions per chunk")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--out", default="bench/results/memory.json", help="JSON output")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child is not None:
        print(json.dumps(measure(args, None if args.child == "none" else int(args.child))))
        return
    rows = []
    for chunk in ("none", str(args.chunk)):
        argv = [a for a in sys.argv[1:] if not a.startswith("--out")]
        result = subprocess.run([sys.executable, __file__, *argv, "--child", chunk], capture_output=True, text=True)
        if result.returncode != 0:
            raise SystemExit(result.stderr)
        rows.append(json.loads(result.stdout.strip().splitlines()[-1]))
    naive, chunked = rows
    print(f"vocab {args.vocab_size}, batch {args.batch} x {args.length} tokens, 2 rounds, {args.device}")
    print("| loss path | peak MiB | loss | seconds |\n|---|---:|---:|---:|")
    for row in rows:
        name = "naive [B, T, V] logits" if row["chunk"] is None else f"chunked ({row['chunk']} positions)"
        print(f"| {name} | {row['peak_mib']} | {row['loss']:.6f} | {row['seconds']} |")
    print(f"peak memory ratio naive/chunked: {naive['peak_mib'] / max(chunked['peak_mib'], 1e-9):.1f}x, "
          f"loss difference {abs(naive['loss'] - chunked['loss']):.2e}")  # fmt: skip
    from pathlib import Path

    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()

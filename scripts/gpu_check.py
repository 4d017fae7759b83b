"""GPU smoke check at a realistic size: a random ~0.5B Qwen2-shaped model in bf16.

Why: CPU tests prove the code is right; this proves it runs and scales on a
GPU (bf16 autocast, a 152k vocabulary with the chunked loss, the KV cache)
and prints the numbers that matter, in a few minutes:

1. ``fit``: a few optimizer steps of the iterative-refine objective through
   the Lightning Trainer (``bf16-mixed``), on the embedded addition task:
   seconds per step, training tokens/s, peak GPU memory.
2. generation at batch 1 and 8, 256 new tokens after a 64-token prompt:
   HF ``generate`` (greedy), refine N=7 R=2 and jacobi N=7 on the same
   weights: tokens/s, tokens per forward, speedup over HF, peak memory.
   The stop id's ``lm_head`` row is the mean of the others, so the random
   model never stops early and every method generates the full budget.

Run it through ``scripts/gpu_check.sh`` (which caps it at 8 minutes).
"""

from __future__ import annotations

import argparse
import time

import lightning as L
import torch

from dllm import iterative_generate
from dllm.data import DLLMDataModule
from dllm.module import DLLMModule

QWEN2_0_5B = dict(  # Qwen2.5-0.5B's shape (~0.49B parameters with tied embeddings)
    model_type="qwen2", hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
    num_key_value_heads=2, max_position_embeddings=4096, vocab_size=151936, tie_word_embeddings=True,
)  # fmt: skip


def peak_gib() -> float:
    return torch.cuda.max_memory_allocated() / 2**30


def check_fit(steps: int, batch_size: int) -> None:
    """A few bf16-mixed training steps; prints time per step and peak memory."""
    torch.cuda.reset_peak_memory_stats()
    module = DLLMModule(model_config=dict(QWEN2_0_5B), loss_chunk_size=2048, lr=1e-4, warmup_steps=0)
    params = sum(p.numel() for p in module.model.parameters())
    data = DLLMDataModule(
        task="addition", num_train=steps * batch_size, num_val=8, batch_size=batch_size, tokenizer=module.tokenizer
    )

    class Timer(L.Callback):
        def __init__(self):
            self.times: list[float] = []
            self.tokens = 0

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            torch.cuda.synchronize()
            self.start = time.perf_counter()
            self.tokens += int(batch["attention_mask"].sum())

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            torch.cuda.synchronize()
            self.times.append(time.perf_counter() - self.start)

    timer = Timer()
    trainer = L.Trainer(
        accelerator="gpu", devices=1, precision="bf16-mixed", max_steps=steps, limit_val_batches=0,
        logger=False, enable_checkpointing=False, callbacks=[timer], enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(module, datamodule=data)
    steady = timer.times[1:] or timer.times  # the first step includes CUDA warm-up
    per_step = sum(steady) / len(steady)
    tokens_per_step = timer.tokens / len(timer.times)
    print(f"\n## fit: {params / 1e6:.0f}M parameters, bf16-mixed, batch {batch_size}, {len(timer.times)} steps")
    print(f"- {per_step:.3f} s/step (after the first), {tokens_per_step / per_step:,.0f} training tokens/s")
    print(f"- loss: {float(trainer.callback_metrics['train/loss']):.3f}; peak GPU memory {peak_gib():.2f} GiB")
    del trainer, module
    torch.cuda.empty_cache()


def check_generation(new_tokens: int, prompt_length: int) -> None:
    """HF generate vs refine vs jacobi on the same bf16 weights."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    kwargs = dict(QWEN2_0_5B)
    config = AutoConfig.for_model(kwargs.pop("model_type"), **kwargs)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).cuda().eval()
    stop = config.vocab_size - 1
    with torch.no_grad():
        head = model.get_output_embeddings().weight
        head[stop] = head[:stop].float().mean(0).to(head.dtype)
    methods = {
        "hf generate": lambda ids, mask: model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
            do_sample=False, eos_token_id=stop, pad_token_id=0,
        ),
        "refine N=7 R=2": lambda ids, mask: iterative_generate(
            model, ids, attention_mask=mask, eos_token_id=stop, pad_token_id=0, add_eos_length=7, refine_iter=2,
            max_new_tokens=new_tokens, return_dict=True,
        ),
        "jacobi N=7": lambda ids, mask: iterative_generate(
            model, ids, attention_mask=mask, eos_token_id=stop, pad_token_id=0, add_eos_length=7, mode="jacobi",
            max_new_tokens=new_tokens, return_dict=True,
        ),
    }  # fmt: skip
    print(f"\n## generation: bf16, {new_tokens} new tokens after a {prompt_length}-token prompt")
    print("| batch | method | tokens/s | tokens/forward | vs HF | peak GiB |")
    print("|---|---|---|---|---|---|")
    for batch in (1, 8):
        ids = torch.randint(2, stop, (batch, prompt_length), device="cuda")
        mask = torch.ones_like(ids)
        hf_rate = None
        for name, run in methods.items():  # each row prints as soon as it is measured
            with torch.no_grad():
                run(ids, mask)  # warm-up
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                start = time.perf_counter()
                out = run(ids, mask)
                torch.cuda.synchronize()
            seconds = time.perf_counter() - start
            if name == "hf generate":
                generated, tpf = out.shape[1] - prompt_length, 1.0
                total = batch * generated
            else:
                total, tpf = int(out.new_tokens.sum()), out.tokens_per_forward
            rate = total / seconds
            hf_rate = hf_rate or rate
            print(f"| {batch} | {name} | {rate:,.0f} | {tpf:.2f} | {rate / hf_rate:.2f}x | {peak_gib():.2f} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--fit-steps", type=int, default=20, help="optimizer steps (default: 20)")
    p.add_argument("--batch-size", type=int, default=8, help="training batch size (default: 8)")
    p.add_argument("--new-tokens", type=int, default=256, help="generated tokens per row (default: 256)")
    p.add_argument("--prompt-length", type=int, default=64, help="random prompt length (default: 64)")
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA device visible")
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    check_fit(args.fit_steps, args.batch_size)
    check_generation(args.new_tokens, args.prompt_length)


if __name__ == "__main__":
    main()

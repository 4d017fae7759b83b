"""Helpers shared by the generation engine's tests: prompts, HF greedy, the refine reference."""

import torch
from conftest import EOS, VOCAB

from dllm import GenerateOutput, iterative_generate


def prompts(lengths: list[int], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded random prompts (no special ids) of the given lengths."""
    gen = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, length in enumerate(lengths):
        ids[row, width - length :] = torch.randint(3, VOCAB, (length,), generator=gen)
        mask[row, width - length :] = 1
    return ids, mask


def hf_greedy(model, ids, mask, max_new_tokens, eos=EOS):
    return model.generate(
        input_ids=ids,
        attention_mask=mask,
        do_sample=False,
        max_new_tokens=max_new_tokens,
        eos_token_id=eos,
        pad_token_id=0,
    )


def naive_refine(model, prompt: list[int], stop_ids: list[int], n: int, r: int, max_new: int, max_length: int):
    """Refine decoding written straight from its definition: one row, no cache, no early exit."""
    generated: list[int] = []
    while True:
        k = min(n + 1, max_new - len(generated), max_length - len(prompt) - len(generated))
        if k <= 0:
            return generated, "length"
        context = prompt + generated
        x = torch.tensor([context + [stop_ids[0]] * (k - 1)])
        block = model(x).logits[0, len(context) - 1 : len(context) - 1 + k].argmax(-1).tolist()
        for _ in range(r - 1):
            x = torch.tensor([context + block[: k - 1]])
            block = model(x).logits[0, len(context) - 1 : len(context) - 1 + k].argmax(-1).tolist()
        generated += block
        stops = [i for i, t in enumerate(block) if t in stop_ids]
        if stops:
            del generated[len(generated) - len(block) + stops[0] + 1 :]
            return generated, "eos"


def generated_rows(out: GenerateOutput, width: int) -> list[list[int]]:
    return [out.sequences[i, width : width + int(n)].tolist() for i, n in enumerate(out.new_tokens)]


def frequent_token(model, ids, mask, steps=30) -> int:
    """A token the model emits often: a stop id that really stops rows."""
    out = iterative_generate(model, ids, mask, eos_token_id=EOS, add_eos_length=0, refine_iter=1, max_new_tokens=steps)
    return int(out[:, ids.size(1) :].flatten().mode().values)

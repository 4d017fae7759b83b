"""``sync_ranks``: under FSDP / ZeRO-3 every forward is a collective, so ranks whose rows are done keep
calling forward on a dummy row until every rank is done. Two gloo processes on CPU."""

import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import EOS, build_model
from generation_helpers import generated_rows, prompts

from dllm import iterative_generate

MODES = [("refine", 3, 2), ("refine", 0, 1), ("jacobi", 4, 1)]


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    model = build_model("llama")
    calls = [0]
    model.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    # rank 0: one short row; rank 1: three rows and a longer budget
    lengths, budget = ([5], 3) if rank == 0 else ([4, 9, 2], 17)
    ids, mask = prompts(lengths, seed=rank)
    results = {}
    for mode, n, r in MODES:
        kwargs = dict(
            eos_token_id=EOS, add_eos_length=n, refine_iter=r, max_new_tokens=budget, mode=mode, return_dict=True
        )
        calls[0] = 0
        synced = iterative_generate(model, ids, mask, sync_ranks=True, **kwargs)
        synced_calls = calls[0]
        alone = iterative_generate(model, ids, mask, **kwargs)
        results[mode + str(n)] = {
            "calls": synced_calls,
            "real": synced.num_forwards,
            "dummy": synced.sync_forwards,
            "same_tokens": generated_rows(synced, ids.size(1)) == generated_rows(alone, ids.size(1)),
        }
    dist.destroy_process_group()
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results))


def test_ranks_make_the_same_number_of_forwards_and_the_same_tokens(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for mode in ranks[0]:
        short, long = ranks[0][mode], ranks[1][mode]
        assert short["calls"] == long["calls"], mode  # every forward paired across ranks
        assert short["same_tokens"] and long["same_tokens"], mode  # waiting changes nothing
        assert short["dummy"] > 0 and long["dummy"] == 0, mode  # rank 0 finished first and waited
        assert short["real"] + short["dummy"] == short["calls"], mode


def test_sync_ranks_without_a_process_group_changes_nothing(models):
    assert not dist.is_initialized()
    ids, mask = prompts([4, 7])
    kwargs = dict(eos_token_id=EOS, add_eos_length=3, max_new_tokens=9, return_dict=True)
    synced = iterative_generate(models["llama"], ids, mask, sync_ranks=True, **kwargs)
    plain = iterative_generate(models["llama"], ids, mask, **kwargs)
    assert torch.equal(synced.sequences, plain.sequences) and synced.sync_forwards == 0


if __name__ == "__main__":  # pragma: no cover
    pytest.main([__file__, "-q"])

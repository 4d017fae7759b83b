"""``--model dllm``: lm-eval's ``hf`` model whose ``generate_until`` runs the dllm engine.

Everything but free-form generation is lm-eval's ``HFLM``: loading, tokenizing, truncation, chat templates
and the log-likelihood requests (the model is an ordinary HF causal LM). ``generate_until`` batches the
requests as ``hf`` does (per task, grouped by generation kwargs, longest first) and runs
``iterative_generate`` once per batch with the settings from ``--model_args``; the engine ends each row
where ``hf`` would (its stop strings are checked inside the engine after every forward,
``dllm.evaluation.stops``) and ``max_gen_toks`` budgets it as ``hf`` does, so greedy jacobi scores exactly
as ``hf``.

``--model_args`` keys: the generation settings of ``DLLM`` below, ``pretrained=`` (an HF folder or name)
or ``ckpt_path=`` (a Lightning checkpoint of ``train.py``), and the keys of lm-eval's ``hf`` model
(``dtype``, ``device``, ``max_length``, ``trust_remote_code``, ...). Any other key is an error.
"""

from __future__ import annotations

import inspect
import pickle
import zipfile
from pathlib import Path

import torch
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM
from lm_eval.models.utils import Collator, handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
from tqdm import tqdm

from dllm.errors import UserError
from dllm.evaluation.meter import METER, hf_stop_ids, per_task
from dllm.evaluation.stops import LmEvalStops
from dllm.generation import iterative_generate
from dllm.generation.sampling import prompt_keys

# The generation settings a request's kwargs may carry (a task's ``generation_kwargs``, ``--gen_kwargs``);
# anything else (``repetition_penalty``, ``num_beams``, ...) the engine cannot honour, and says so.
REQUEST_SAMPLING = ("do_sample", "temperature", "top_k", "top_p")
# lm-eval's ``hf`` arguments, and one that it passes on to ``from_pretrained``
HF_ARGS = {name for name in inspect.signature(HFLM.__init__).parameters if name not in ("self", "kwargs")} | {
    "attn_implementation"
}


@register_model("dllm")
class DLLM(HFLM):
    """An lm-eval model that generates with ``dllm.iterative_generate``.

    Args:
        pretrained: HF folder or name of the model (this or ``ckpt_path``).
        ckpt_path: a Lightning checkpoint of ``train.py``: its model and tokenizer are evaluated.
        mode: ``"jacobi"`` (lossless: exactly the greedy or sampled text of plain decoding, in fewer
            forwards; the default, so a score is the model's own) or ``"refine"`` (block drafting).
        add_eos_length: N, placeholders per block (a block yields N + 1 tokens); jacobi: the longest draft.
        refine_iter: R, forwards per block in refine mode.
        temperature: sampling temperature; ``None`` takes the request's (a task's ``generation_kwargs``,
            ``--gen_kwargs``), as ``hf`` does; a number here wins over the request's.
        top_k: as ``temperature``.
        top_p: as ``temperature``.
        seed: sampling seed (a prompt's sample does not depend on its batch).
        use_cache: reuse the committed prefix's KV cache.
        adaptive_draft: jacobi: choose each draft length (0 to N) from measured acceptance and cost.
        add_bos_token: ``False`` (the default here) encodes prompts without special tokens, as dllm's
            training and ``predict.py`` do; give ``hf`` the same (``add_bos_token=False``) to compare.
        device: as ``hf``'s; default ``cuda`` when there is one, else ``cpu``.
        dtype: as ``hf``'s (``float32``, ``bfloat16``, ``float64``, ...); also applied to a checkpoint.
        **kwargs: lm-eval's ``hf`` arguments (``batch_size``, ``max_length``, ``trust_remote_code``, ...).

    Raises:
        UserError: on an unknown key, a bad value, a missing model, an unreadable checkpoint.
    """

    def __init__(
        self,
        pretrained: str | None = None,
        ckpt_path: str | None = None,
        mode: str = "jacobi",
        add_eos_length: int = 15,
        refine_iter: int = 2,
        temperature: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int = 0,
        use_cache: bool = True,
        adaptive_draft: bool = True,
        add_bos_token: bool | None = False,
        device: str | None = None,
        dtype: str | torch.dtype | None = "auto",
        **kwargs,
    ) -> None:
        unknown = sorted(set(kwargs) - HF_ARGS)
        if unknown:
            raise UserError(
                f"--model_args {unknown[0]}: not an argument of --model dllm (generation: mode, add_eos_length, "
                "refine_iter, temperature, top_k, top_p, seed, use_cache, adaptive_draft; the model: pretrained or "
                "ckpt_path, and lm-eval's hf arguments such as dtype, device, max_length)"
            )
        if (pretrained is None) == (ckpt_path is None):
            raise UserError("--model_args: give pretrained=<HF folder or name> or ckpt_path=<checkpoint>, one of them")
        self.generation = _generation_settings(
            mode=mode, add_eos_length=add_eos_length, refine_iter=refine_iter, temperature=temperature,
            top_k=top_k, top_p=top_p, seed=seed, use_cache=use_cache, adaptive_draft=adaptive_draft,
        )  # fmt: skip
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        if ckpt_path is not None:
            model, tokenizer = load_checkpoint(str(ckpt_path))
            if dtype not in (None, "auto"):
                model = model.to(getattr(torch, dtype) if isinstance(dtype, str) else dtype)
            kwargs.update(pretrained=model.to(device), tokenizer=kwargs.get("tokenizer") or tokenizer)
        else:
            kwargs.update(pretrained=pretrained, device=device, dtype=dtype)
        super().__init__(add_bos_token=add_bos_token, **kwargs)
        if self.backend != "causal":
            raise UserError(f"--model dllm: {pretrained or ckpt_path} is not a causal LM (backend {self.backend!r})")
        self.stop_ids = hf_stop_ids(self)

    def generate_until(self, requests: list, disable_tqdm: bool = False) -> list[str]:
        """Generate for lm-eval's requests, task by task (each task's tokens, forwards and time are measured)."""
        if not isinstance(self.batch_size, int):
            raise UserError(f"--batch_size {self.batch_size}: --model dllm needs a number")
        bar = tqdm(total=len(requests), disable=disable_tqdm or self.rank != 0, desc="generate_until (dllm)")
        results = per_task(requests, lambda part: self._generate_task(part, bar))
        bar.close()
        return results

    def _generate_task(self, requests: list, bar: tqdm) -> list[str]:
        """One task's requests in ``hf``'s batches: grouped by generation kwargs, the longest prompts first."""
        collator = Collator(
            [request.args for request in requests],
            sort_fn=lambda args: (-len(self.tok_encode(args[0])), args[0]),
            group_by="gen_kwargs",
            group_fn=lambda args: args[1],
        )
        texts = []
        for chunk in collator.get_batched(n=self.batch_size):
            contexts, all_kwargs = zip(*chunk)
            for context, text in zip(contexts, self._generate_batch(list(contexts), all_kwargs[0])):
                texts.append(text)
                self.cache_hook.add_partial("generate_until", (context, all_kwargs[0]), text)
                bar.update(1)
        return collator.get_original(texts)

    def _generate_batch(self, contexts: list[str], gen_kwargs: dict) -> list[str]:
        """Encode, truncate and budget as ``hf``'s ``generate_until``; generate; cut where ``hf`` stops."""
        kwargs = normalize_gen_kwargs(gen_kwargs, self.max_gen_toks)
        eos_text = self.tok_decode(self.eot_token_id, skip_special_tokens=False)
        until = handle_stop_sequences(kwargs.pop("until", None), eos=eos_text)
        max_gen_toks = kwargs.pop("max_gen_toks")
        max_context = self.max_length - max_gen_toks
        if max_context <= 0:
            raise UserError(f"max_gen_toks={max_gen_toks} leaves no room for a prompt in max_length={self.max_length}")
        ids, mask = self.tok_batch_encode(contexts, left_truncate_len=max_context, truncation=self.truncation)
        max_new = kwargs.pop("max_length", ids.shape[1] + max_gen_toks) - ids.shape[1]  # hf: counts the padding
        sampling = self._sampling(kwargs)
        keys = prompt_keys(ids, mask) if sampling["temperature"] > 0 else None
        settings = self.generation
        out = iterative_generate(
            self.model, ids, mask,
            eos_token_id=self.stop_ids, pad_token_id=self.tokenizer.pad_token_id,
            add_eos_length=settings["add_eos_length"], refine_iter=settings["refine_iter"], mode=settings["mode"],
            max_new_tokens=max_new, max_length=int(mask.sum(-1).max()) + max_new,
            generator=torch.Generator(device=self.device).manual_seed(settings["seed"]), sample_keys=keys,
            use_cache=settings["use_cache"], adaptive_draft=settings["adaptive_draft"], return_dict=True,
            # where hf stops, checked after every forward at each new token (EOS ids are the engine's own stops;
            # EOS's text stays a stop string, as for hf: tokens may spell it out)
            stop_criterion=LmEvalStops(until, self.tokenizer),
            **sampling,
        )  # fmt: skip
        counts = METER.current
        counts.forwards += out.num_forwards
        counts.row_forwards += int(out.forwards.sum())
        counts.generated_tokens += int(out.new_tokens.sum())  # up to where each row stopped
        width = ids.shape[1]
        return [
            self._text(row[width : width + int(n)].tolist(), until) for row, n in zip(out.sequences, out.new_tokens)
        ]

    def _sampling(self, kwargs: dict) -> dict:
        """temperature / top_k / top_p: the request's, unless ``--model_args`` set them."""
        extra = sorted(set(kwargs) - set(REQUEST_SAMPLING))
        if extra:
            raise UserError(
                f"generation kwarg {extra[0]}={kwargs[extra[0]]!r}: --model dllm cannot honour it "
                f"(it takes until, max_gen_toks, max_length, {', '.join(REQUEST_SAMPLING)})"
            )
        sampling = {  # do_sample without a temperature: generate()'s default, 1.0
            "temperature": float(kwargs.get("temperature", 1.0)) if kwargs.get("do_sample") else 0.0,
            "top_k": kwargs.get("top_k") if kwargs.get("do_sample") else None,
            "top_p": kwargs.get("top_p") if kwargs.get("do_sample") else None,
        }
        for name in sampling:
            if self.generation[name] is not None:
                sampling[name] = self.generation[name]
        return sampling

    def _text(self, tokens: list[int], until: list[str]) -> str:
        """The response text from the kept tokens, as ``hf``'s ``generate_until`` makes it."""
        think = self.think_end_token
        if isinstance(think, int) and think in tokens:
            tokens = tokens[len(tokens) - tokens[::-1].index(think) :]
        text = self.tok_decode(tokens)
        if isinstance(think, int):
            text = text.lstrip()
        return postprocess_generated_text(text, until, think if isinstance(think, str) else None)


def _generation_settings(**settings) -> dict:
    """Check the generation settings from ``--model_args``, each error naming its key."""
    types = {"mode": str, "add_eos_length": int, "refine_iter": int, "temperature": float, "top_k": int,
             "top_p": float, "seed": int, "use_cache": bool, "adaptive_draft": bool}  # fmt: skip
    for name, value in settings.items():
        kind = types[name]
        if kind is int and isinstance(value, float) and value.is_integer():  # lm-eval reads "-1" as -1.0
            value = settings[name] = int(value)
        ok = value is None and name in ("temperature", "top_k", "top_p")
        ok = ok or isinstance(value, kind) and not (kind is int and isinstance(value, bool))
        ok = ok or kind is float and isinstance(value, int) and not isinstance(value, bool)
        if not ok:
            raise UserError(f"--model_args {name}={value!r}: expected {kind.__name__}")
    checks = {
        "mode": (settings["mode"] in ("refine", "jacobi"), "'refine' or 'jacobi'"),
        "add_eos_length": (settings["add_eos_length"] >= 0, ">= 0"),
        "refine_iter": (settings["refine_iter"] >= 1, ">= 1"),
        "temperature": (settings["temperature"] is None or settings["temperature"] >= 0, ">= 0 (0 = greedy)"),
        "top_k": (settings["top_k"] is None or settings["top_k"] >= 1, ">= 1"),
        "top_p": (settings["top_p"] is None or 0 < settings["top_p"] <= 1, "in (0, 1]"),
    }
    for name, (ok, expected) in checks.items():
        if not ok:
            raise UserError(f"--model_args {name}={settings[name]!r}: must be {expected}")
    return settings


def load_checkpoint(path: str) -> tuple[torch.nn.Module, object]:
    """The HF model (eval mode) and tokenizer inside a ``DLLMModule`` checkpoint."""
    from dllm.module import DLLMModule  # Lightning: only for checkpoints

    file = Path(path)
    if not file.is_file():
        raise UserError(f"--model_args ckpt_path={path}: no such file")
    if not zipfile.is_zipfile(file):
        raise UserError(f"--model_args ckpt_path={path}: not a torch checkpoint (truncated, or another file)")
    try:
        module = DLLMModule.load_from_checkpoint(file, map_location="cpu", weights_only=False)
    except (KeyError, RuntimeError, pickle.UnpicklingError, TypeError) as e:
        raise UserError(f"--model_args ckpt_path={path}: not a dllm checkpoint ({type(e).__name__}: {e})") from None
    return module.model.eval(), module.tokenizer

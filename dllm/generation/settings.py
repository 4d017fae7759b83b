"""``GenerationSettings``: the generation knobs of ``model.generation`` (train.py, predict.py) and their checks.

Apart from ``DLLMModule`` because they are generation's, not Lightning's: pure Python, checked when the config is
read (before any model loads), and used by the module, the CLI's early checks and the benches alike.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

from dllm.errors import UserError
from dllm.generation.draft_sources import parse_sources


@dataclass
class GenerationSettings:
    """How ``predict_step`` and validation generate (docs/method.md, sections 2-5).

    Args:
        mode: ``"refine"`` (block drafting, the original method) or ``"jacobi"`` (lossless: exactly greedy or
            exactly sampled next-token decoding, in fewer forwards).
        add_eos_length: N, EOS placeholders per block; a block yields N + 1 tokens. Jacobi: the longest draft
            (15: 31, 63 and 127 measured no better with adaptive drafts, on SmolLM2's grounded prompts nor on the
            recipe model of bench/quality.py; docs/method.md, section 4).
        refine_iter: forwards per block in refine mode (1 = draft only).
        max_new_tokens: generated tokens per prompt.
        max_length: prompt + generated tokens per prompt.
        temperature: 0 for greedy, else sampling temperature.
        top_k: sample from the k most likely tokens.
        top_p: sample from the nucleus of this probability mass.
        seed: sampling seed. A prompt's random numbers depend only on (seed, its id, the position), so its
            sample is the same whatever the batch, the number of devices or a resumed run.
        use_cache: reuse the KV cache of the committed prefix.
        adaptive_draft: jacobi: choose each row's draft length (0 to N) from the measured acceptance and the
            measured cost of a longer forward; false always drafts N.
        draft_sources: jacobi: where drafts come from besides the model's own guesses: ``"all"`` (default),
            ``"none"``, or a comma list of ``ngram`` (the continuation of the latest earlier occurrence of the
            last committed tokens in the prompt and the answer: a few dict look-ups per row and forward) and
            ``pool`` (n-grams recycled from earlier forwards' predictions and rejected drafts: one look-up, two
            insertions). Per row and forward the candidate with the most expected confirmed tokens is
            verified; the output never changes, only the forwards. Refine mode ignores it.
        trace: print the refinement of each batch's first prompt: per block and round (jacobi: per forward)
            the decoded tokens, which changed, and the top-3 candidates with their probabilities.
    """

    mode: Literal["refine", "jacobi"] = "refine"
    add_eos_length: int = 15
    refine_iter: int = 2
    max_new_tokens: int = 1024
    max_length: int = 8192
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int = 0
    use_cache: bool = True
    adaptive_draft: bool = True
    draft_sources: str = "all"
    trace: bool = False

    def __post_init__(self) -> None:
        # Checked here, when the config is read, so a bad value fails before any model loads.
        checks = {
            "mode": (self.mode in ("refine", "jacobi"), "'refine' or 'jacobi'"),
            "add_eos_length": (self.add_eos_length >= 0, ">= 0"),
            "refine_iter": (self.refine_iter >= 1, ">= 1"),
            "max_new_tokens": (self.max_new_tokens >= 1, ">= 1"),
            "max_length": (self.max_length >= 2, ">= 2 (a prompt token and a generated one)"),
            "temperature": (self.temperature >= 0, ">= 0 (0 = greedy)"),
            "top_k": (self.top_k is None or self.top_k >= 1, ">= 1 or null"),
            "top_p": (self.top_p is None or 0 < self.top_p <= 1, "in (0, 1] or null"),
        }
        for name, (ok, expected) in checks.items():
            if not ok:
                raise UserError(f"model.generation.{name} must be {expected}, got {getattr(self, name)!r}")
        try:
            parse_sources(self.draft_sources)
        except ValueError as error:
            raise UserError(f"model.generation.{error}") from None

    def recorded(self) -> dict:
        """The settings a prediction record stores: all but ``trace``, which only prints."""
        return {name: value for name, value in asdict(self).items() if name != "trace"}

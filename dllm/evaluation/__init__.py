"""Score dllm models with lm-evaluation-harness, with tokens per forward next to accuracy.

- ``DLLM`` (``--model dllm``, ``dllm.evaluation.model``): lm-eval's ``hf`` model whose free-form
  generation runs the dllm engine (jacobi or refine, any N and R), with ``hf``'s stop strings and budgets.
- ``python -m dllm.evaluation`` (``dllm.evaluation.__main__``): lm-eval's own command line, plus the
  offline ``dllm_<task>`` tasks (``dllm.evaluation.tasks``) and, per task, the tokens per forward, the
  forwards and tokens/s (``dllm.evaluation.meter``) in the printed table and the output files.

Importing this package imports lm-eval (the ``eval`` extra: ``pip install -e ".[eval]"``) and registers
``dllm`` as an lm-eval model. See docs/evaluation.md.
"""

from dllm.evaluation.meter import METER, add_generation_metrics, instrument_hf
from dllm.evaluation.model import DLLM

__all__ = ["DLLM", "METER", "add_generation_metrics", "instrument_hf"]

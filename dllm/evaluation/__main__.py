"""``python -m dllm.evaluation``: lm-eval's command line with the dllm model, tasks and speed metrics.

Every flag is lm-eval's (``--model dllm|hf``, ``--model_args``, ``--tasks``, ``--limit``, ``--batch_size``,
``--output_path``, ``--log_samples``, ``--apply_chat_template``, ``ls tasks``, ...); this entry point adds:

- the ``dllm`` model (``dllm.evaluation.model``);
- the offline ``dllm_<task>`` tasks shipped in ``dllm.evaluation.tasks`` (beside any ``--include_path``).
  When every task asked for is one of them, lm-eval's ~15,000 built-in tasks are not indexed (13 s of
  CPU per run on a small machine);
- per task, ``tokens_per_forward``, ``forwards``, ``tokens_per_s``, ``generated_tokens`` and
  ``generate_seconds`` of the generation (``dllm.evaluation.meter``), for ``--model dllm`` and for
  lm-eval's ``hf``, in the printed table and in the results file.

A mistake in ``--model_args`` or a generation setting prints one ``error:`` line and exits with code 2.
Example (offline, CPU)::

    python -m dllm.evaluation --model dllm --model_args ckpt_path=runs/tiny/checkpoints/last.ckpt,mode=jacobi \\
        --tasks dllm_addition_small --apply_chat_template --device cpu --batch_size 16 --output_path runs/eval
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from dllm.errors import UserError

SHIPPED_PREFIX = "dllm"


def _flag_values(argv: Sequence[str], *flags: str) -> list[str]:
    """The values given after any of ``flags`` (``--tasks a b``, ``--tasks=a,b``), split on commas."""
    values: list[str] = []
    for i, arg in enumerate(argv):
        name, eq, value = arg.partition("=")
        if name not in flags:
            continue
        if eq:
            values += value.split(",")
            continue
        for following in argv[i + 1 :]:
            if following.startswith("-"):
                break
            values += following.split(",")
    return [v for v in values if v]


def only_shipped_tasks(argv: Sequence[str]) -> bool:
    """Whether ``--tasks`` names only ``dllm`` (the tag) and ``dllm_<task>`` tasks."""
    tasks = _flag_values(argv, "--tasks", "-t")
    return bool(tasks) and all(t == SHIPPED_PREFIX or t.startswith(SHIPPED_PREFIX + "_") for t in tasks)


@contextmanager
def harness_hooks(argv: Sequence[str]) -> Iterator[None]:
    """While inside, lm-eval's command line sees the shipped tasks and reports the generation metrics.

    lm-eval builds its task index and calls ``simple_evaluate`` inside its ``run`` command, with no hook
    for either, so both are wrapped here (and restored on exit): the task index gets this package's task
    folder (and skips the built-in tasks when none is asked for), and the results get each task's metrics.
    """
    import lm_eval.evaluator
    import lm_eval.tasks
    from lm_eval.config.evaluate_config import EvaluatorConfig

    from dllm.evaluation.meter import METER, add_generation_metrics, instrument_hf
    from dllm.evaluation.tasks import TASKS_DIR

    task_manager, simple_evaluate = lm_eval.tasks.TaskManager, lm_eval.evaluator.simple_evaluate
    process_tasks = EvaluatorConfig.process_tasks
    defaults = not only_shipped_tasks(argv)

    class TaskManager(task_manager):
        def __init__(self, *args, include_path=None, include_defaults: bool = True, **kwargs):
            given = include_path if isinstance(include_path, (list, tuple)) else [include_path] if include_path else []
            super().__init__(
                *args, include_path=[str(TASKS_DIR), *given], include_defaults=include_defaults and defaults, **kwargs
            )

    def evaluate(*args, **kwargs):
        METER.reset()
        return add_generation_metrics(simple_evaluate(*args, **kwargs), METER)

    def known_tasks(self, *args, **kwargs):  # lm-eval raises a bare ValueError (a traceback) for an unknown name
        try:
            return process_tasks(self, *args, **kwargs)
        except ValueError as e:
            if not str(e).startswith("Tasks not found"):
                raise
            missing = str(e).partition(":")[2].strip()
            listed = "`python -m dllm.evaluation ls tasks` lists them"
            raise UserError(f"--tasks {missing}: no such task ({listed})") from None

    lm_eval.tasks.TaskManager, lm_eval.evaluator.simple_evaluate = TaskManager, evaluate
    EvaluatorConfig.process_tasks = known_tasks
    try:
        with instrument_hf():
            yield
    finally:
        lm_eval.tasks.TaskManager, lm_eval.evaluator.simple_evaluate = task_manager, simple_evaluate
        EvaluatorConfig.process_tasks = process_tasks


def check_model_path(argv: Sequence[str]) -> None:
    """``--model_args pretrained=<path>``: a local folder that does not exist fails here, not as an HF traceback.

    Checked before lm-eval imports (seconds) and before any model loads.
    """
    from dllm.checks import check_pretrained

    for item in _flag_values(argv, "--model_args"):
        key, eq, value = item.partition("=")
        if eq and key.strip() == "pretrained":
            check_pretrained(value.strip(), f"--model_args pretrained={value.strip()}")


def main(argv: Sequence[str] | None = None) -> int:
    """Run lm-eval's command line on ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        check_model_path(argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        print('error: lm-eval is not installed; pip install -e ".[eval]"', file=sys.stderr)
        return 2
    from lm_eval.__main__ import cli_evaluate

    import dllm.evaluation  # noqa: F401  registers --model dllm

    saved = sys.argv
    sys.argv = ["python -m dllm.evaluation", *argv]
    try:
        with harness_hooks(argv):
            cli_evaluate()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        sys.argv = saved
    return 0


if __name__ == "__main__":
    sys.exit(main())

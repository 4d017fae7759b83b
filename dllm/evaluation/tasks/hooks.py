"""The functions the task YAML files name (``!function hooks.load_dataset``): lm-eval loads this file by path."""

from dllm.evaluation.tasks import load_dataset, process_results

__all__ = ["load_dataset", "process_results"]

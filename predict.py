"""Generate with a trained dllm model, one JSONL record per prompt.

    python predict.py --config configs/predict-tiny.yaml --ckpt_path runs/tiny/checkpoints/last.ckpt \\
        --data.prompts_file examples/prompts.txt --predictions.output predictions.jsonl

Generation settings (``--model.generation.*``) on the command line or in the
config take effect even with ``--ckpt_path``.
"""

import sys

from dllm.cli import DLLMCLI

if __name__ == "__main__":
    DLLMCLI(args=["predict", *sys.argv[1:]], save_config_callback=None)

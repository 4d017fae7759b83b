"""Generate with a trained dllm model, one JSONL record per prompt.

    python predict.py --config configs/predict-tiny.yaml --ckpt_path runs/tiny/checkpoints/last.ckpt \\
        --data.prompts_file examples/prompts.txt

The output defaults to ``<trainer.default_root_dir>/predictions.jsonl``
(``--predictions.output`` to choose). Generation settings (``--model.generation.*``)
on the command line or in the config take effect even with ``--ckpt_path``. A rerun
reuses the records that match it; ``--predictions.overwrite true`` replaces them.
"""

from dllm.cli import main

if __name__ == "__main__":
    main("predict", save_config_callback=None)

"""Train (or validate) a dllm model: ``python train.py fit --config configs/tiny.yaml``.

Any LightningCLI flag works: ``--print_config``, ``--trainer.max_steps 200``,
``--trainer.default_root_dir runs/x`` (moves checkpoints, logs and the HF export),
``--ckpt_path last`` to resume the newest run in that folder. A mistake prints one
``error:`` line and exits with code 2; add ``--debug`` for the traceback.
"""

from dllm.cli import main

if __name__ == "__main__":
    main()

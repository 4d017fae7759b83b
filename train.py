"""Train (or validate) a dllm model: ``python train.py fit --config configs/tiny.yaml``.

Any LightningCLI flag works: ``--print_config``, ``--trainer.max_steps 200``,
``--ckpt_path last`` to resume.
"""

from dllm.cli import DLLMCLI

if __name__ == "__main__":
    DLLMCLI()

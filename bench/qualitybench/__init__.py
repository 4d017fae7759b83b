"""The modules of ``bench/quality.py`` (a folder not named ``quality``, which would shadow the script).

``settings`` (the objectives, the stage-2 recipes, the model and :class:`~qualitybench.settings.Setup`),
``training`` (train or reuse each model, in worker processes), ``evaluation`` (decode the test prompts with
each method and score them) and ``report`` (the markdown tables and the plots).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from a checkout without installing

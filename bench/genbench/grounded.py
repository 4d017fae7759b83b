"""Section 5 of ``bench/generation.py``: the real model on input-grounded prompts, and its plot.

:data:`GROUNDED_PROMPTS` (answers that copy much of the prompt), the configurations (HF, HF prompt lookup at
batch 1, adaptive jacobi N=15 with the default draft sources and with each source alone) and
:func:`plot_grounded` (``--plot``: speed ratios to HF ``generate``).
"""

from __future__ import annotations

from pathlib import Path

from genbench.harness import Config

# answers that copy much of the prompt: rewrite, edit code, fix text, reformat data, answer from a passage
GROUNDED_PROMPTS = [
    # fix text
    "Fix the spelling mistakes in this sentence and write it out again: "
    '"The quick brwn fox jumpd over the lazzy dog and ran into the forrest."',
    # rewrite
    "Rewrite this paragraph in a formal tone:\n\n"
    "Hey team, the meeting got moved to Thursday at 3pm because the room was double booked. "
    "Please bring your laptops and the sales numbers from last quarter. If you can't make it, "
    "let Sarah know by Wednesday so she can send you the notes.",
    # edit code
    "Rename the variable `x` to `total` in this Python function and return the full function:\n\n"
    "def add_all(numbers):\n    x = 0\n    for n in numbers:\n        x = x + n\n    return x\n",
    # edit code: docstring
    "Add a docstring to this function and return the complete code:\n\n"
    "def is_prime(n):\n    if n < 2:\n        return False\n    for i in range(2, int(n ** 0.5) + 1):\n"
    "        if n % i == 0:\n            return False\n    return True\n",
    # reformat data
    "Convert this CSV to a JSON list of objects:\n\nname,age,city\nAlice,30,Paris\nBob,25,London\n"
    "Carol,41,Berlin\nDave,35,Madrid\n",
    # reformat list
    "Turn this comma-separated list into a numbered list, one item per line: "
    "apples, bananas, cherries, dates, elderberries, figs, grapes, honeydew melon",
    # answer from passage
    "Read the passage and answer the question.\n\nPassage: The Eiffel Tower is a wrought-iron lattice tower on "
    "the Champ de Mars in Paris, France. It is named after the engineer Gustave Eiffel, whose company designed "
    "and built the tower from 1887 to 1889. It was the entrance arch to the 1889 World's Fair.\n\n"
    "Question: Who is the Eiffel Tower named after, and when was it built?",
    # fix grammar email
    "Correct the grammar of this email and write the corrected email:\n\n"
    "Dear Mr. Smith,\n\nI am writing to informs you that the package have been delivered yesterday. "
    "We was very happy with the service and we will uses your company again.\n\nBest regards,\nAnna",
    # edit code: print to logging
    "Replace every print call with logging.info in this code and show the result:\n\n"
    'import logging\n\ndef process(items):\n    print("starting")\n    for item in items:\n'
    '        print("processing", item)\n    print("done")\n',
    # reformat: markdown table
    "Reformat this data as a markdown table with columns Country and Capital:\n\n"
    "France - Paris\nGermany - Berlin\nItaly - Rome\nSpain - Madrid\nPortugal - Lisbon\n",
    # answer from passage, longer
    "Answer using only the text below.\n\nText: Photosynthesis is the process by which green plants use sunlight "
    "to make food from carbon dioxide and water. It takes place mainly in the leaves, inside small structures "
    "called chloroplasts, which contain a green pigment called chlorophyll. The process releases oxygen as a "
    "by-product, which is why plants are so important for life on Earth.\n\n"
    "Question: Where does photosynthesis take place, and what does it release?",
    # rewrite: replace words
    'Repeat the following text, replacing every occurrence of "cat" with "dog":\n\n'
    "The cat sat on the mat. The cat was happy because the cat had eaten. Later the cat slept.",
    # edit code: add type hints
    "Add type hints to this function and return it:\n\n"
    "def greet(name, times):\n    result = []\n    for _ in range(times):\n"
    '        result.append("Hello, " + name)\n    return result\n',
    # fix text: capitalisation
    'Fix the capitalization of this text: "my name is john. i live in new york and i work at google."',
]
GROUNDED_SOURCES = ["all", "none", "ngram", "pool"]  # jacobi: defaults, then each source alone
GROUNDED_N = 15  # GenerationSettings' default add_eos_length


def grounded_configs(batch_sizes: list[int], new_tokens: int, sources: list[str] = GROUNDED_SOURCES) -> list[Config]:
    """Input-grounded prompts: HF, HF prompt lookup (batch 1 only: HF refuses larger batches), adaptive jacobi
    with each of ``sources`` (default: the default sources, then each source alone)."""
    configs = []
    for batch in batch_sizes:
        configs.append(Config("grounded", "hf", batch, new_tokens))
        if batch == 1:
            configs.append(Config("grounded", "hf", batch, new_tokens, lookup=True))
        configs += [Config("grounded", "jacobi", batch, new_tokens, GROUNDED_N, adaptive=True, sources=s)
                    for s in sources]  # fmt: skip
    return configs


def plot_grounded(rows: list[dict], path: Path) -> None:
    """Bar chart: tokens/s as a multiple of HF ``generate`` per method, batch 1 and 8, input-grounded prompts."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batches = sorted({r["batch"] for r in rows})
    fig, axes = plt.subplots(1, len(batches), figsize=(5.5 * len(batches), 3.6), squeeze=False)
    for ax, batch in zip(axes[0], batches):
        mine = [r for r in rows if r["batch"] == batch]
        labels = [r["label"].replace("jacobi N=15 adaptive ", "jacobi ").replace("sources=", "") for r in mine]
        ratios = [r["ratio_to_hf"] for r in mine]
        colors = ["#888888" if r["method"] == "hf" else "#3b7dd8" for r in mine]
        ax.barh(labels[::-1], ratios[::-1], color=colors[::-1])
        ax.axvline(1.0, color="black", linewidth=0.8)
        for y, (value, r) in enumerate(zip(ratios[::-1], mine[::-1])):
            same = "" if r["matches_hf"] is None else (" =" if r["matches_hf"] else " DIFFERS")
            ax.text(value, y, f" {value:.2f}x{same}", va="center", fontsize=8)
        ax.set_title(f"batch {batch}")
        ax.set_xlabel("tokens/s / HF generate")
        ax.set_xlim(0, max(ratios) * 1.35)
    fig.suptitle("SmolLM2-135M, input-grounded prompts, CPU 1 thread (= : same tokens as HF greedy)", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)

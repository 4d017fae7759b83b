"""Reporting of ``bench/quality.py``: the markdown tables and the plots.

:func:`summary` (one line per model: speed, accuracy, training cost), :func:`table` (every model and
method), :func:`curve_table` (stage 2's validation points against training seconds) and :func:`plots`
(``accuracy_vs_tpf.png``, ``finetune_curve.png``, ``learning_curve.png``).
"""

from __future__ import annotations

from pathlib import Path

from qualitybench.settings import FINETUNES, Setup

Rows = dict[str, list[dict]]  # model name -> one row per method


def pick(rows: list[dict], label: str) -> dict | None:
    return next((r for r in rows if r["method"] == label), None)


def summary(results: Rows, timing: dict[str, dict], batch1: Rows, setup: Setup) -> str:
    """One line per model: the two questions (how much faster, at what accuracy) and the training cost."""
    middle = sorted(setup.refine_n)[len(setup.refine_n) // 2]  # N=7 in the full grid
    n, refine = max(setup.jacobi_n), f"refine N={middle} R={max(setup.refine_r)}"
    sft = results["sft"][0]["accuracy"] if "sft" in results else None
    stage1 = timing.get("sft", {}).get("train_s")
    lines = [
        f"| model | AR accuracy | of SFT's | jacobi N={n}: TPF | ... sources=none | x HF generate (batch "
        f"{setup.eval_batch}) | x HF generate (batch 1) | adaptive jacobi: TPF, x HF (batch 1) | ... sources=none "
        f"| {refine}: accuracy | of own AR | training s (of SFT's) | training CPU s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]

    def share(a: float, b: float | None) -> str:
        return f"{a / b:.1%}" if b else "-"

    for name, rows in results.items():
        hf, jac, ref = rows[0], pick(rows, f"jacobi N={n}"), pick(rows, refine)
        none = pick(rows, f"jacobi N={n} sources=none")
        single = {r["mode"] + (" none" if r.get("sources") else ""): r for r in batch1.get(name, [])}
        seconds = timing.get(name, {}).get("train_s")
        cost = f"{seconds:.0f}" + (f" ({seconds / stage1:.0%})" if stage1 and name != "sft" else "") if seconds else "-"
        one = f"{single['jacobi']['tokens_per_s'] / single['hf']['tokens_per_s']:.2f}x" if single else "-"
        ada = single.get("adaptive")
        ada = f"{ada['tpf']:.2f}, {ada['tokens_per_s'] / single['hf']['tokens_per_s']:.2f}x" if ada else "-"
        own = single.get("adaptive none")
        own = f"{own['tpf']:.2f}, {own['tokens_per_s'] / single['hf']['tokens_per_s']:.2f}x" if own else "-"
        none_tpf = f"{none['tpf']:.2f}" if none else "-"
        jac_tpf = f"{jac['tpf']:.2f}" if jac else "-"
        jac_x = f"{jac['tokens_per_s'] / hf['tokens_per_s']:.2f}x" if jac else "-"
        ref_acc = f"{ref['accuracy']:.1%}" if ref else "-"
        ref_share = share(ref["accuracy"], hf["accuracy"]) if ref else "-"
        lines.append(
            f"| {name} | {hf['accuracy']:.1%} | {share(hf['accuracy'], sft)} | {jac_tpf} | {none_tpf} | {jac_x} "
            f"| {one} | {ada} | {own} "
            f"| {ref_acc} | {ref_share} | {cost} | {timing.get(name, {}).get('train_cpu_s', '-')} |"
        )
    return "\n".join(lines) + "\n"


def table(results: dict[str, list[dict]]) -> str:
    lines = [
        "| model | method | accuracy | TPF | tokens/s | x HF generate | same as AR |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for name, rows in results.items():
        hf = rows[0]["tokens_per_s"]
        for row in rows:
            lines.append(
                f"| {name} | {row['method']} | {row['accuracy']:.1%} | {row['tpf']:.2f} | {row['tokens_per_s']:,.0f} "
                f"| {row['tokens_per_s'] / hf:.2f}x | {row['same_as_ar']:.1%} |"
            )
    return "\n".join(lines) + "\n"


def stage2_seconds(timing: dict[str, dict], name: str, step: int, setup: Setup) -> float | None:
    """Training CPU seconds (one thread, validation excluded) after ``step`` stage-2 steps.

    CPU seconds, not wall clock: on a shared machine they compare objectives whatever else ran beside each.
    Steps cost the same throughout, so the time of step ``k`` is ``k / steps`` of the whole.
    """
    seconds = timing.get(name, {}).get("train_cpu_s", timing.get(name, {}).get("train_s"))
    return None if seconds is None else seconds * step / setup.stage2_steps_of(name)


def curve_table(curves: dict[str, list], timing: dict[str, dict], setup: Setup) -> str:
    """Stage 2's validation points against steps and training seconds: compare objectives at equal wall clock."""
    lines = [
        f"| model | step | training CPU s | validation accuracy (AR) | validation jacobi TPF (N={setup.stage2_n}) |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, points in curves.items():
        if name not in FINETUNES:
            continue
        for step, accuracy, tpf in points:
            seconds = stage2_seconds(timing, name, step, setup)
            shown = "-" if seconds is None else f"{seconds:.0f}"
            lines.append(f"| {name} | {step} | {shown} | {accuracy:.1%} | {tpf:.2f} |")
    return "\n".join(lines) + "\n"


def plots(
    results: dict[str, list[dict]], curves: dict[str, list], timing: dict[str, dict], out: Path, setup: Setup
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for k, (name, rows) in enumerate(results.items()):
        color = f"C{k}"
        ax.scatter([1.0], [rows[0]["accuracy"]], color=color, marker="*", s=120)
        for mode, style in (("refine", "-o"), ("jacobi", "--s")):
            points = sorted((r["tpf"], r["accuracy"]) for r in rows if r["mode"] == mode and not r.get("sources"))
            if points:
                ax.plot(*zip(*points), style, color=color, label=f"{name} {mode}", alpha=0.85)
    ax.set_xlabel("tokens per forward")
    ax.set_ylabel("test accuracy")
    ax.set_title("accuracy vs tokens per forward (star: AR)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6.5, ncol=2)
    fig.tight_layout()
    fig.savefig(out / "accuracy_vs_tpf.png", dpi=120)
    plt.close(fig)

    fig, (acc, tpf) = plt.subplots(1, 2, figsize=(10, 4))
    for k, name in enumerate(results):
        points = curves.get(name) or []
        if name in FINETUNES and points and stage2_seconds(timing, name, 0, setup) is not None:
            steps, em, speed = zip(*points)
            seconds = [stage2_seconds(timing, name, step, setup) for step in steps]
            acc.plot(seconds, em, "-o", color=f"C{k}", label=name)
            tpf.plot(seconds, speed, "-o", color=f"C{k}", label=name)
    acc.set_ylabel("validation accuracy (greedy AR)")
    tpf.set_ylabel(f"validation jacobi tokens per forward (N={setup.stage2_n})")
    for ax in (acc, tpf):
        ax.set_xlabel("stage-2 training CPU seconds, one thread (0: the SFT model)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("refine fine-tuning of the SFT model")
    fig.tight_layout()
    fig.savefig(out / "finetune_curve.png", dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    for k, name in enumerate(results):
        points = curves.get(name) or []
        if name not in FINETUNES and points:
            ax.plot([p[0] for p in points], [p[1] for p in points], "-o", color=f"C{k}", label=name)
    ax.set_xlabel("training step (from scratch)")
    ax.set_ylabel("validation accuracy (greedy AR)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "learning_curve.png", dpi=120)
    plt.close(fig)

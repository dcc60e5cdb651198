"""``zreward ablate``'s outputs: mean ± std over seeds, the markdown table and the PNG."""
from __future__ import annotations

from pathlib import Path

import numpy as np

METRICS = (("plcc", "PLCC"), ("srcc", "SRCC"), ("hpa", "HPA"), ("margin_hpa", "margin HPA"))


def summarise(arms: dict[str, list[dict]]) -> dict[str, dict]:
    """Per arm and metric (and output tokens per score): mean and sample std over seeds (std None for one seed)."""
    summary = {}
    for name, runs in arms.items():
        columns = {key: [run["metrics"][key] for run in runs] for key, _ in METRICS}
        tokens = [run["tokens_per_score"] for run in runs]
        summary[name] = {key: _mean_std(values) for key, values in columns.items()}
        summary[name]["tokens_per_score"] = _mean_std(tokens) if None not in tokens else {"mean": None, "std": None}
        summary[name]["seeds"] = len(runs)
    return summary


def _mean_std(values) -> dict:
    values = np.asarray(values, dtype=np.float64)
    return {"mean": float(values.mean()), "std": float(values.std(ddof=1)) if values.size > 1 else None}


def write_table(result: dict, path: Path) -> None:
    """Markdown: one row per arm, mean ± std over seeds, with the run's settings above it."""
    config = result["config"]
    pairs = [run["metrics"]["pairs"] for run in next(iter(result["arms"].values()))]
    settings = (
        f"Seeds 0..{config['seeds'] - 1}; {config['teacher_steps']} steps per teacher arm "
        f"({_updates(config['gdso']['updates_per_batch'])} each), {config['student_steps']} steps (one "
        f"optimizer update each) per student arm; {min(pairs)}-{max(pairs)} held-out pairs per seed; "
        f"device {result['device']}, "
        f"{result['workers']} worker(s) x {config['threads']} thread(s); {result['runtime_s'] / 60:.1f} min."
    )
    if config.get("annotators", 1) > 1 or config.get("annotator_noise", 0.0) > 0:
        settings += (f" Labels: {config['annotators']} annotator(s) per (image, dimension), each half a point off "
                     f"with probability {config['annotator_noise']}, ground truth their trimmed mean.")
    lines = [
        settings,
        "",
        "| role | arm | what it trains | " + " | ".join(label for _, label in METRICS) + " | output tokens / score |",
        "|---|---|---|" + "---:|" * (len(METRICS) + 1),
    ]
    for name, stats in result["summary"].items():
        role, description = result["descriptions"][name]
        cells = [_format(stats[key]) for key, _ in METRICS]
        tokens = stats["tokens_per_score"]["mean"]
        cells.append("–" if tokens is None else f"{tokens:.1f}")
        lines.append(f"| {role} | {name} | {description} | " + " | ".join(cells) + " |")
    path.write_text("\n".join(lines) + "\n")


def _format(stat: dict) -> str:
    return f"{stat['mean']:.3f}" if stat["std"] is None else f"{stat['mean']:.3f} ± {stat['std']:.3f}"


def write_plot(result: dict, path: Path) -> None:
    """Held-out HPA per arm with error bars over seeds, and the held-out HPA curves of teacher and student arms."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    names = list(result["summary"])
    colours = {name: f"C{i}" for i, name in enumerate(names)}
    means = [result["summary"][n]["hpa"]["mean"] for n in names]
    errors = [result["summary"][n]["hpa"]["std"] or 0.0 for n in names]
    axes[0].bar(range(len(names)), means, yerr=errors, capsize=4, color=[colours[n] for n in names])
    axes[0].axhline(0.5, color="gray", linestyle=":", linewidth=1)
    axes[0].set_xticks(range(len(names)), [n.replace("_", "\n") for n in names], fontsize=8)
    axes[0].set(title="held-out HPA (mean ± std over seeds)", ylim=(0, 1))
    for axis, role in zip(axes[1:], ("teacher", "student")):
        for name in names:
            runs = result["arms"][name]
            if result["descriptions"][name][0] != role or len(runs[0]["curve"]) < 2:  # zero-shot: one point
                continue
            curves = np.asarray([run["curve"] for run in runs], dtype=np.float64)  # [seeds, points, (step, hpa)]
            steps, hpa = curves[0, :, 0], curves[:, :, 1]
            axis.plot(steps, hpa.mean(0), color=colours[name], label=name)
            if len(runs) > 1:
                axis.fill_between(steps, hpa.min(0), hpa.max(0), color=colours[name], alpha=0.15)
        axis.axhline(0.5, color="gray", linestyle=":", linewidth=1)
        axis.set(title=f"{role} arms: held-out HPA while training (band: seed range)", xlabel="trainer step",
                 ylabel="HPA" if role == "student" else "HPA (one reasoning sample per image)")
        if axis.get_legend_handles_labels()[0]:  # a run of some arms may have no trained arm of this role
            axis.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _updates(count: int) -> str:
    return "one optimizer update" if count == 1 else f"{count} optimizer updates"

"""Training curves as PNGs (matplotlib, headless): the distillation and the plugins, from their CSV logs."""

from __future__ import annotations

from pathlib import Path

from autoglm_train.pipeline.sources import Series

DPI = 90


def _axes(ncols: int):
    try:
        import matplotlib
    except ImportError as exc:
        raise ImportError("the report's plots need matplotlib: pip install 'autoglm-train[report]'") from exc

    matplotlib.use("Agg")  # no display needed; must precede pyplot
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, ncols, figsize=(4.2 * ncols, 3.2), dpi=DPI)
    return fig, list(axes) if ncols > 1 else [axes]


def _plot(ax, series: Series | None, label: str, marker: str = "") -> bool:
    if not series:
        return False
    steps, values = zip(*series, strict=True)
    ax.plot(steps, values, marker=marker, markersize=4, linewidth=1.4, label=label)
    return True


def _finish(fig, ax_list, path: Path) -> Path:
    for ax in ax_list:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
        else:  # e.g. fewer steps than trainer.log_every_n_steps
            ax.text(0.5, 0.5, "no points logged", ha="center", va="center", transform=ax.transAxes, color="gray")
    fig.tight_layout()
    fig.savefig(path)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


def distill_curves(metrics: dict[str, Series], path: Path) -> Path | None:
    """Loss / KD loss / CE loss, and validation agreement with the teacher + KL to it."""
    if not metrics:
        return None
    fig, (loss, agree) = _axes(2)
    for key, label in (("train/loss", "loss"), ("train/kd_loss", "KD loss"), ("train/ce_loss", "CE loss")):
        _plot(loss, metrics.get(key), label)
    loss.set_title("distillation: training losses", fontsize=10)
    _plot(agree, metrics.get("val/teacher_top1_agreement"), "top-1 agreement w/ teacher", "o")
    agree.set_ylabel("agreement")
    agree.set_title("validation", fontsize=10)
    kl = metrics.get("val/kl_to_teacher")
    if kl:
        twin = agree.twinx()
        twin.plot(
            *zip(*kl, strict=True), color="tab:red", marker="s", markersize=4, linewidth=1.2, label="KL to teacher"
        )
        twin.set_ylabel("KL (nats/token)", color="tab:red")
        twin.legend(fontsize=8, loc="center right")
    return _finish(fig, [loss, agree], path)


def plugin_curves(runs: dict[str, dict[str, Series]], path: Path) -> Path | None:
    """Per plugin: training loss, gate value, and the validation headline (digit accuracy / WER)."""
    runs = {name: m for name, m in runs.items() if m}
    if not runs:
        return None
    fig, (loss, gate, val) = _axes(3)
    for name, m in runs.items():
        _plot(loss, m.get("train/loss"), name)
        _plot(gate, m.get(f"train/gate_{name}"), name)
        _plot(val, m.get("val/digit_accuracy"), f"{name}: digit accuracy", "o") or _plot(
            val, m.get("val/accuracy"), f"{name}: exact match", "o"
        )
        _plot(val, m.get("val/wer"), f"{name}: WER", "s")
    loss.set_title("plugins: training loss", fontsize=10)
    gate.set_title("gate tanh(w·mean+b)", fontsize=10)
    val.set_title("validation (greedy)", fontsize=10)
    return _finish(fig, [loss, gate, val], path)

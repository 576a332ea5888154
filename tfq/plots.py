"""Plots a person would rather look at than read."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # headless: training machines have no display
import matplotlib.pyplot as plt  # noqa: E402


def stage_curves(rows, path, title=""):
    """Validation accuracy per epoch across stages (like the paper's Figures 2-3).

    Args:
      rows: per-epoch dicts with ``stage``, ``global_epoch``, ``val_accuracy`` and,
        for guided stages, ``val_fp_accuracy``. Stages named ``<method>/<stage>``
        are drawn per method, each method's epochs counted from its own start.
      path: the PNG to write.
      title: figure title.
    """
    fig, ax = plt.subplots(figsize=(9, 5))
    offsets, colours = {}, plt.rcParams["axes.prop_cycle"].by_key()["color"]
    by_stage = {}
    for r in rows:
        by_stage.setdefault(r["stage"], []).append(r)
    fp_end = len(by_stage.get("00_fp", []))
    for i, (stage, rs) in enumerate(by_stage.items()):
        method = stage.split("/")[0] if "/" in stage else "fp"
        start = offsets.setdefault(method, fp_end if method != "fp" else 0)
        xs = [start + j + 1 for j in range(len(rs))]
        offsets[method] = xs[-1]
        colour = colours[i % len(colours)]
        ys = [100 * r.get("val_accuracy", float("nan")) for r in rs]
        ax.plot(xs, ys, "-o", ms=3, color=colour, label=stage)
        fp = [r.get("val_fp_accuracy") for r in rs]
        if all(v is not None for v in fp):
            ax.plot(xs, [100 * v for v in fp], ":", color=colour, alpha=0.7)
        ax.axvline(xs[0] - 0.5, color="grey", lw=0.5, ls="--")
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation top-1 (%)  [dotted: guiding full-precision net]")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=110)
    plt.close(fig)

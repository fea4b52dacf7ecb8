"""Tables and the chart: medians per (metric, target), ratios against nbdkit's C cow filter."""

import statistics
from dataclasses import dataclass


@dataclass(frozen=True)
class Metric:
    key: str
    title: str
    unit: str
    higher_is_better: bool


def fmt_value(v, unit):
    if v is None:
        return "—"
    if unit == "IOPS":
        return f"{v / 1000:.1f}k" if v >= 10000 else f"{v:.0f}"
    if unit == "MiB/s":
        return f"{v:.0f}" if v >= 100 else f"{v:.1f}"
    if unit == "s":
        return f"{v:.2f}"
    if unit == "ms":
        return f"{v:.0f}" if v >= 100 else f"{v:.1f}"
    if unit == "MiB":
        return f"{v:.0f}" if v >= 100 else f"{v:.1f}"
    return f"{v:.3g}"


def ratio(v, ref, higher_is_better):
    """Speed relative to the reference: >1 means better than it, whichever way the unit points."""
    if v is None or ref is None or v <= 0 or ref <= 0:
        return None
    return v / ref if higher_is_better else ref / v


class Results:
    """Raw values per (metric key, column), medians, and the errors met on the way."""

    def __init__(self):
        self.values = {}   # (metric key, column) -> [values]
        self.errors = []   # (what, column, message)

    def add(self, key, column, value):
        if value is not None:
            self.values.setdefault((key, column), []).append(value)

    def median(self, key, column):
        vals = self.values.get((key, column))
        return statistics.median(vals) if vals else None

    def count(self, key, column):
        return len(self.values.get((key, column), ()))

    def to_json(self):
        return {"values": [{"metric": k, "column": c, "values": v} for (k, c), v in self.values.items()],
                "errors": [{"what": w, "column": c, "message": m} for w, c, m in self.errors]}


def table(results, metrics, columns, labels, reference, *, show_ratio=True, first="workload",
          extra=()):
    """A markdown table: one row per metric, one column per target; 'value (ratio×)' cells.
    extra: more columns, as (heading, function of the metric giving the cell's text)."""
    head = f"| {first} | " + " | ".join([labels[c] + (" (ref)" if c == reference else "")
                                         for c in columns] + [h for h, _ in extra]) + " |"
    lines = [head, "|" + "---|" * (len(columns) + len(extra) + 1)]
    for m in metrics:
        ref = results.median(m.key, reference) if reference in columns else None
        cells = []
        for c in columns:
            v = results.median(m.key, c)
            if v is None:
                failed = any(w == m.key and col == c for w, col, _ in results.errors)
                cells.append("error" if failed else "—")
                continue
            cell = fmt_value(v, m.unit)
            r = ratio(v, ref, m.higher_is_better)
            if show_ratio and r is not None and c != reference:
                cell += f" ({r:.2f}×)"
            cells.append(cell)
        cells += [fn(m) for _, fn in extra]
        lines.append(f"| {m.title} ({m.unit}) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def ratio_column(results, column, over, heading):
    """An extra column for table(): column's median over another column's, per metric."""
    def cell(m):
        r = ratio(results.median(m.key, column), results.median(m.key, over), m.higher_is_better)
        return f"{r:.2f}×" if r is not None else "—"
    return heading, cell


COLOURS = {
    "cow-server": "#d62728",
    "cow-shim": "#ff7f0e",
    "python-null": "#bcbd22",
    "nbdkit-cow": "#1f77b4",
    "qemu-nbd": "#2ca02c",
    "nbdkit-file": "#7f7f7f",
}


def chart(path, results, ratio_metrics, scaling, columns, labels, reference, title):
    """PNG: left, speed ratios vs the reference per workload; right, throughput vs connections."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    nscale = len(scaling)
    fig = plt.figure(figsize=(14, max(6.5, 0.55 * len(ratio_metrics) * max(1, len(columns)) / 2.2)),
                     layout="constrained")
    if nscale:
        grid = fig.add_gridspec(nscale, 2, width_ratios=[1.35, 1])
        ax = fig.add_subplot(grid[:, 0])
    else:
        ax = fig.add_subplot()
    # Only the targets with a bar somewhere (a section may measure a few of them).
    shown = [c for c in columns if c != reference
             and any(ratio(results.median(m.key, c), results.median(m.key, reference),
                           m.higher_is_better) is not None for m in ratio_metrics)]
    height = 0.8 / max(1, len(shown))
    ymax = 0.0
    for i, c in enumerate(shown):
        ys, xs = [], []
        for j, m in enumerate(ratio_metrics):
            r = ratio(results.median(m.key, c), results.median(m.key, reference), m.higher_is_better)
            if r is not None:
                ys.append(j + (i - (len(shown) - 1) / 2) * height)
                xs.append(r)
        bars = ax.barh(ys, xs, height=height * 0.92, color=COLOURS.get(c), label=labels[c])
        ax.bar_label(bars, fmt="%.2f", padding=2, fontsize=7)
        ymax = max([ymax] + xs)
    ax.axvline(1.0, color=COLOURS.get(reference, "black"), lw=2,
               label=f"{labels.get(reference, reference)} = 1")
    ax.set_yticks(range(len(ratio_metrics)), [m.title for m in ratio_metrics], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, max(1.2, ymax * 1.15))
    ax.set_xlabel(f"speed relative to {labels.get(reference, reference)} (>1 is faster)")
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(axis="x", alpha=0.3)

    for k, (name, unit, keys) in enumerate(scaling):
        sx = fig.add_subplot(grid[k, 1])
        for c in columns:
            pts = [(n, results.median(key, c)) for n, key in keys]
            pts = [(n, v) for n, v in pts if v is not None]
            if pts:
                sx.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", color=COLOURS.get(c),
                        label=labels[c], lw=2 if c == reference else 1.3)
        sx.set_xscale("log", base=2)
        ns = [n for n, _ in keys]
        sx.set_xticks(ns, [str(n) for n in ns])
        sx.set_xlabel("connections (fio jobs)")
        sx.set_ylabel(unit)
        sx.set_title(f"scaling: {name} (higher is better)", fontsize=10)
        sx.set_ylim(bottom=0)
        sx.grid(alpha=0.3)
        if k == 0:
            sx.legend(fontsize=7, loc="best")
    fig.suptitle(title, fontsize=11)
    fig.savefig(path, dpi=110)
    plt.close(fig)

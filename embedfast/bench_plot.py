"""PNG charts of a ``python -m embedfast bench`` report (matplotlib, an optional extra)."""

from __future__ import annotations


def plot(report: dict, path: str, sweep: str | None = None) -> None:
    """Bars of time per contender (and GB/s), or with a sweep, each contender's time against the work."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise SystemExit(f"--plot needs matplotlib (pip install 'embedfast[plot]'): {error}") from None
    directions = sorted({r["direction"] for run in report["runs"] for r in run["results"]})
    fig, axes = plt.subplots(len(directions), 2, figsize=(12, 4 * len(directions)), squeeze=False)
    for row, direction in enumerate(directions):
        time_ax, rate_ax = axes[row]
        if sweep:
            _sweep_curves(report, direction, sweep, time_ax, rate_ax)
        else:
            _bars(report, direction, time_ax, rate_ax)
    fig.suptitle(f"embedfast on {report['machine']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _bars(report, direction, time_ax, rate_ax):
    for run in report["runs"]:
        rows = [r for r in run["results"] if r["direction"] == direction and r["median_ms"] is not None]
        label = run["problem"]["dtype"]
        names = [r["contender"] for r in rows]
        time_ax.barh([f"{n} ({label})" for n in names], [r["median_ms"] for r in rows])
        rate_ax.barh([f"{n} ({label})" for n in names], [r["gbps"] for r in rows])
    time_ax.set_xlabel(f"{direction}: median ms (lower is better)")
    rate_ax.set_xlabel(f"{direction}: GB/s of the bytes the op must move (floor = bare gather/copy)")


def _sweep_curves(report, direction, sweep, time_ax, rate_ax):
    key = "batch" if sweep == "tokens" else "dim"
    curves: dict[str, list[tuple[float, float, float]]] = {}
    for run in report["runs"]:
        problem = run["problem"]
        x = problem["batch"] * problem["seq_len"] if sweep == "tokens" else problem[key]
        for r in run["results"]:
            if r["direction"] == direction and r["median_ms"] is not None:
                curves.setdefault(f"{r['contender']} ({problem['dtype']})", []).append((x, r["median_ms"], r["gbps"]))
    for name, points in curves.items():
        xs, ms, gbps = zip(*sorted(points))
        time_ax.plot(xs, ms, marker="o", label=name)
        rate_ax.plot(xs, gbps, marker="o", label=name)
    for ax, label in ((time_ax, "median ms"), (rate_ax, "GB/s")):
        ax.set_xlabel("tokens" if sweep == "tokens" else "embedding_dim")
        ax.set_ylabel(f"{direction}: {label}")
        ax.set_xscale("log", base=2)
        ax.legend(fontsize=7)

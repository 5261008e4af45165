"""Figure and tables of a sweep written by examples/moco_sweep.py.

    .venv/bin/python examples/plot_moco_sweep.py docs/moco_sweep.json --png docs/moco_sweep.png \
        --csv docs/moco_sweep.csv

Panels: pretext accuracy and the probes of the frozen query backbone (k-NN, 1-shot and 5-shot
nearest centroid, linear probe) against images per rank, one line per key-encoder BN mode,
error bars = sd over seeds; references (raw pixels, untrained encoder) as horizontal lines; and
how far the statistics a rank could borrow are from its own, against images per rank. Prints
Markdown tables (mean ± sd over seeds) and writes one CSV row per size x mode.

With --compare, no figure: a table of the sweep's final metrics against another sweep's for
the same sizes and modes (e.g. real horovodrun ranks against simulated ones):

    .venv/bin/python examples/plot_moco_sweep.py docs/moco_others_real.json \
        --compare docs/moco_sweep.json
"""
import argparse
import csv
import json
import statistics
from collections import defaultdict

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

MODES = ["plain", "shuffle", "shuffle-g2", "sync", "others"]
COLOURS = {"plain": "tab:red", "shuffle": "tab:blue", "shuffle-g2": "tab:purple",
           "sync": "tab:green", "others": "tab:orange"}
METRICS = [("pretext_acc", "pretext accuracy (positive ranked first)"),
           ("knn_acc", "k-NN (k=20), all 1,297 labels"),
           ("1shot", "nearest centroid, 1 label per class"),
           ("5shot", "nearest centroid, 5 labels per class"),
           ("linear", "linear probe, 10 labels per class")]
LENDERS = ["other rank", "half of another rank", "all other ranks", "global batch"]


def value(probe, metric):
    v = probe[metric]
    return v["mean"] if isinstance(v, dict) else v


def mean_sd(values):
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarise(runs):
    """(mode, size) -> metric -> [one value per seed]; plus the references per size."""
    cells = defaultdict(lambda: defaultdict(list))
    for r in sorted(runs, key=lambda r: r["seed"]):
        cell = cells[(r["mode"], r["images_per_rank"])]
        for metric, _ in METRICS:
            cell[metric].append(value(r["final"], metric))
            if metric != "pretext_acc":
                cell["raw " + metric].append(value(r["raw_pixels"], metric))
                cell["untrained " + metric].append(value(r["untrained"], metric))
    return cells


def distances(runs):
    """size -> lender -> [mean over layers of the mean shift, one per run] (all modes, seeds)."""
    out = defaultdict(lambda: defaultdict(lambda: {"mean_shift": [], "scale_error": []}))
    for r in runs:
        for lender, d in r.get("stat_distances", {}).items():
            for key in ("mean_shift", "scale_error"):
                out[r["images_per_rank"]][lender][key].append(statistics.mean(d[key]))
    return out


def plot(runs, cells, dist, png):
    sizes = sorted({r["images_per_rank"] for r in runs})
    modes = [m for m in MODES if any(r["mode"] == m for r in runs)]
    fig, axes = plt.subplots(2, 3, figsize=(15, 8.5))
    for (metric, title), ax in zip(METRICS, axes.flat):
        for i, mode in enumerate(modes):
            points = [(s, *mean_sd(cells[(mode, s)][metric])) for s in sizes if (mode, s) in cells]
            xs = [p[0] * (1 + 0.03 * (i - len(modes) / 2)) for p in points]  # dodge error bars
            ax.errorbar(xs, [p[1] for p in points], yerr=[p[2] for p in points], marker="o",
                        ms=4, capsize=3, color=COLOURS[mode], label=mode)
        if metric != "pretext_acc":
            any_cell = next(iter(cells.values()))
            ax.axhline(statistics.mean(any_cell["raw " + metric]), color="grey", ls="--", lw=1,
                       label="raw pixels")
            ax.axhline(statistics.mean(v for c in cells.values() for v in c["untrained " + metric]),
                       color="grey", ls=":", lw=1, label="untrained encoder")
        ax.set_title(title, fontsize=10)
    ax = axes.flat[5]
    for lender, style in zip(LENDERS, ["-", "--", "-.", ":"]):
        points = [(s, *mean_sd(dist[s][lender]["mean_shift"])) for s in sizes if lender in dist[s]]
        if points:
            ax.errorbar([p[0] for p in points], [p[1] for p in points],
                        yerr=[p[2] for p in points], ls=style, marker="o", ms=4, capsize=3,
                        color="black", label=lender)
    ax.set_yscale("log")
    ax.set_title("mean shift of a rank's normalised keys,\nborrowed vs own statistics "
                 "(sd units, mean over BN layers)", fontsize=10)
    for ax in axes.flat:
        ax.set_xscale("log", base=2)
        ax.set_xticks(sizes, [str(s) for s in sizes])
        ax.set_xlabel("images per rank")
        ax.grid(alpha=0.3)
    axes.flat[1].legend(fontsize=8, loc="lower right")
    axes.flat[5].legend(fontsize=8)
    sweep = runs[0]
    fig.suptitle(f"MoCo on sklearn digits, {sweep['ranks']} simulated ranks, "
                 f"{sweep['args']['epochs']} epochs per run; error bars: sd over seeds "
                 f"{sorted({r['seed'] for r in runs})}")
    fig.tight_layout()
    fig.savefig(png, dpi=100)


def tables(runs, cells, dist):
    sizes = sorted({r["images_per_rank"] for r in runs})
    modes = [m for m in MODES if any(r["mode"] == m for r in runs)]
    lines = ["| images per rank | key BN | pretext acc | k-NN | 1-shot | 5-shot | linear (10/class) |",
             "|---|---|---|---|---|---|---|"]
    for s in sizes:
        for mode in modes:
            if (mode, s) in cells:
                lines.append(f"| {s} | {mode} | " + " | ".join(
                    "{:.3f} ± {:.3f}".format(*mean_sd(cells[(mode, s)][m])) for m, _ in METRICS)
                    + " |")
    any_cell = next(iter(cells.values()))
    untrained = {m: [v for c in cells.values() for v in c["untrained " + m]]
                 for m, _ in METRICS[1:]}
    lines.append("| - | raw pixels | - | " + " | ".join(
        f"{statistics.mean(any_cell['raw ' + m]):.3f}" for m, _ in METRICS[1:]) + " |")
    lines.append("| - | untrained encoder | - | " + " | ".join(
        "{:.3f} ± {:.3f}".format(*mean_sd(untrained[m])) for m, _ in METRICS[1:]) + " |")
    lines += ["", "| images per rank | " + " | ".join(LENDERS) + " |",
              "|---|" + "---|" * len(LENDERS)]
    for s in sizes:
        lines.append(f"| {s} | " + " | ".join(
            "{:.3f} / {:.3f}".format(statistics.mean(dist[s][lender]["mean_shift"]),
                                     statistics.mean(dist[s][lender]["scale_error"]))
            if lender in dist[s] else "-" for lender in LENDERS) + " |")
    return "\n".join(lines)


def per_layer(runs):
    """Mean shift per BN layer, per size, averaged over runs: the borrowed-rank lender."""
    out = defaultdict(list)
    for r in runs:
        if "stat_distances" in r:
            out[r["images_per_rank"]].append(r["stat_distances"]["other rank"]["mean_shift"])
    return "\n".join(f"{s}: " + ", ".join(f"{statistics.mean(col):.3f}" for col in zip(*rows))
                     for s, rows in sorted(out.items()))


def write_csv(runs, cells, path):
    sizes = sorted({r["images_per_rank"] for r in runs})
    with open(path, "w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["images_per_rank", "mode", "seeds"] + [f"{m}_{stat}" for m, _ in METRICS
                                                             for stat in ("mean", "sd")])
        for s in sizes:
            for mode in MODES:
                if (mode, s) in cells:
                    c = cells[(mode, s)]
                    out.writerow([s, mode, len(c["knn_acc"])] + [
                        f"{v:.4f}" for m, _ in METRICS for v in mean_sd(c[m])])


def compare(runs, reference):
    """Markdown: per size and mode of `runs`, each final metric as mean ± sd over seeds for
    `runs` and for `reference`, the difference of the means, and whether it is within the seed
    spread (|difference| <= the root mean square of the two sds over seeds)."""
    metrics = [m for m, _ in METRICS] + ["loss"]
    names = {"pretext_acc": "pretext acc", "knn_acc": "k-NN", "1shot": "1-shot",
             "5shot": "5-shot", "linear": "linear (10/class)", "loss": "loss"}
    lines = ["| images per rank | mode | metric | this sweep | reference | difference | "
             "within seed spread |", "|---|---|---|---|---|---|---|"]
    verdicts = []
    for size, mode in sorted({(r["images_per_rank"], r["mode"]) for r in runs}):
        mine = [r for r in runs if (r["images_per_rank"], r["mode"]) == (size, mode)]
        ref = [r for r in reference if (r["images_per_rank"], r["mode"]) == (size, mode)]
        if not ref:
            continue
        for metric in metrics:
            (m1, s1), (m2, s2) = (mean_sd([value(r["final"], metric) for r in rs])
                                  for rs in (mine, ref))
            spread = ((s1 ** 2 + s2 ** 2) / 2) ** 0.5
            within = abs(m1 - m2) <= spread
            verdicts.append(within)
            seeds = f" ({len(mine)} / {len(ref)} seeds)" if metric == metrics[0] else ""
            lines.append(f"| {size} | {mode}{seeds} | {names[metric]} | {m1:.3f} ± {s1:.3f} | "
                         f"{m2:.3f} ± {s2:.3f} | {m1 - m2:+.3f} | "
                         f"{'yes' if within else 'no'} ({abs(m1 - m2) / spread:.1f} sd) |")
    lines.append(f"\n{sum(verdicts)} of {len(verdicts)} differences within the seed spread")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sweep", help="JSON written by moco_sweep.py")
    p.add_argument("--png", default="docs/moco_sweep.png")
    p.add_argument("--csv", help="one row per size x mode: mean and sd over seeds")
    p.add_argument("--compare", metavar="REFERENCE_JSON",
                   help="only print a table of the final metrics against this sweep's")
    args = p.parse_args()
    with open(args.sweep) as f:
        runs = json.load(f)["runs"]
    if args.compare:
        with open(args.compare) as f:
            print(compare(runs, json.load(f)["runs"]))
        return
    cells, dist = summarise(runs), distances(runs)
    plot(runs, cells, dist, args.png)
    if args.csv:
        write_csv(runs, cells, args.csv)
    print(tables(runs, cells, dist))
    print("\nmean shift per BN layer (another rank's statistics vs own), by images per rank:")
    print(per_layer(runs))


if __name__ == "__main__":
    main()

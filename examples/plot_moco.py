"""Plot and tabulate runs of examples/moco_digits.py (one --out JSON per run).

    .venv/bin/python examples/plot_moco.py RUN.json ... --png docs/moco_digits.png \
        --csv docs/moco_results.csv --json docs/moco_results.json

Draws pretext loss, pretext accuracy and k-NN accuracy against epoch, one colour per --bn
mode (thin lines: seeds, thick line: mean over seeds), and prints a Markdown table of the
final figures per mode and seed.
"""
import argparse
import csv
import json
import statistics
from collections import defaultdict

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

MODES = ["shuffle", "plain", "sync"]
COLOURS = {"shuffle": "tab:blue", "plain": "tab:red", "sync": "tab:green"}
PANELS = [("loss", "pretext loss (InfoNCE)"), ("pretext_acc", "pretext accuracy"),
          ("knn_acc", "k-NN accuracy, held-out digits")]
LAST = 10  # epochs averaged for the "last-10" columns, less noisy than the final epoch alone


def load_runs(paths):
    runs = defaultdict(dict)  # mode -> seed -> record
    for path in paths:
        with open(path) as f:
            run = json.load(f)
        runs[run["args"]["bn"]][run["args"]["seed"]] = run
    return runs


def summary(run):
    trained = [e for e in run["epochs"] if e["epoch"] > 0]
    tail = trained[-LAST:]
    return {"loss": trained[-1]["loss"], "pretext_acc": trained[-1]["pretext_acc"],
            "knn_acc": trained[-1]["knn_acc"],
            "knn_acc_last10": statistics.mean(e["knn_acc"] for e in tail),
            "knn_acc_untrained": run["epochs"][0]["knn_acc"],
            "train_seconds": run.get("train_seconds", float("nan"))}


def plot(runs, png):
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for mode in [m for m in MODES if m in runs]:
        seeds = runs[mode]
        for key, ax in zip([k for k, _ in PANELS], axes):
            curves = []
            for run in seeds.values():
                points = [(e["epoch"], e[key]) for e in run["epochs"] if key in e]
                ax.plot(*zip(*points), color=COLOURS[mode], alpha=0.3, lw=0.8)
                curves.append(points)
            n = min(len(c) for c in curves)
            mean = [statistics.mean(c[i][1] for c in curves) for i in range(n)]
            ax.plot([p[0] for p in curves[0][:n]], mean, color=COLOURS[mode], lw=2,
                    label=f"{mode} BN key encoder ({len(seeds)} seed{'s' * (len(seeds) > 1)})")
    any_run = next(iter(next(iter(runs.values())).values()))
    axes[2].axhline(any_run["knn_raw_pixels"], color="grey", ls="--", lw=1,
                    label="k-NN on raw pixels")
    for (key, title), ax in zip(PANELS, axes):
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes[2].legend(loc="lower right", fontsize=8)
    fig.suptitle(f"MoCo on sklearn digits, {any_run['ranks']} Horovod ranks x batch "
                 f"{any_run['args']['batch_size']}, queue {any_run['args']['queue']}")
    fig.tight_layout()
    fig.savefig(png, dpi=110)


def write_csv(runs, path):
    with open(path, "w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["bn", "seed", "epoch", "loss", "pretext_acc", "knn_acc", "epoch_seconds"])
        for mode in sorted(runs):
            for seed in sorted(runs[mode]):
                for e in runs[mode][seed]["epochs"]:
                    out.writerow([mode, seed, e["epoch"]] + [
                        "" if e.get(k) is None else f"{e[k]:.6g}"
                        for k in ("loss", "pretext_acc", "knn_acc", "epoch_seconds")])


def markdown_table(runs):
    cols = ["loss", "pretext_acc", "knn_acc", "knn_acc_last10", "train_seconds"]
    lines = ["| key-encoder BN | seed | final pretext loss | final pretext acc | final k-NN acc "
             f"| k-NN acc, mean of last {LAST} epochs | training time (s) |",
             "|---|---|---|---|---|---|---|"]
    for mode in [m for m in MODES if m in runs]:
        rows = {seed: summary(run) for seed, run in sorted(runs[mode].items())}
        for seed, s in rows.items():
            lines.append(f"| {mode} | {seed} | " + " | ".join(
                f"{s[c]:.1f}" if c == "train_seconds" else f"{s[c]:.4f}" for c in cols) + " |")
        if len(rows) > 1:
            cells = []
            for c in cols:
                values = [s[c] for s in rows.values()]
                fmt = ".1f" if c == "train_seconds" else ".4f"
                cells.append(f"**{statistics.mean(values):{fmt}}** ± {statistics.stdev(values):{fmt}}")
            lines.append(f"| **{mode}** | mean ± sd | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="JSON files written by moco_digits.py --out")
    p.add_argument("--png", default="docs/moco_digits.png")
    p.add_argument("--csv", help="per-epoch metrics of every run")
    p.add_argument("--json", help="all runs' records in one file")
    args = p.parse_args()
    runs = load_runs(args.runs)
    plot(runs, args.png)
    if args.csv:
        write_csv(runs, args.csv)
    if args.json:
        with open(args.json, "w") as f:
            json.dump([runs[m][s] for m in sorted(runs) for s in sorted(runs[m])], f, indent=1)
    print(markdown_table(runs))


if __name__ == "__main__":
    main()

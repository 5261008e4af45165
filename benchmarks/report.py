"""Summarise the JSON results of run_all.py into RESULTS.md and results.png.

    .venv/bin/python benchmarks/report.py [--results benchmarks/results] [--out benchmarks]

Every figure is a median over interleaved samples with its interquartile range (IQR); a ratio
or difference between two variants is computed per round (the two were timed back to back in the
same round) and then summarised, which cancels most of the machine's load drift.
The chart needs matplotlib; without it only RESULTS.md is written.
"""
import argparse
import json
import math
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
SHUFFLES = ("shuffle-horovod", "shuffle-mpi")  # borrow_from="permutation" (the default)
OTHERS = ("others-horovod", "others-mpi")       # borrow_from="others"
LAYERS = SHUFFLES + OTHERS                     # every ShuffleBatchNorm variant
NETWORK = "network.json"  # network.py's result: its own section, from cost_model.py
# Each layer variant's exchanges as raw calls (bench.py's micro part).
FLOOR = {"shuffle-horovod": "hvd.floor", "shuffle-mpi": "mpi.floor",
         "others-horovod": "hvd.floor-others", "others-mpi": "mpi.floor-others"}
# Over plain BatchNorm at 2 ranks, Horovod defaults: (model, measure, label, bound).
STEP_GOALS = [("resnet18", "train", "ResNet-18 training step", 1.05),
              ("thin", "train", "thin network (16 BN layers of 16 channels) training step", 1.15),
              ("resnet18", "keyfwd", "ResNet-18 key-encoder forward (no grad)", 1.10)]
# One layer, one process, groups_per_rank=2, local transport, input 8x16x2x2 (host_cost.py):
# (measure, aten ops at most, host time at most this many times BatchNorm2d's).
HOST_GOALS = {"train": (24, 3.0), "no_grad": (12, 4.0)}
HOST_COST = "host-cost-"  # host_cost.py's runs: a section of their own
BASELINES = ("syncbn", "original", "sample-shuffle")
SUM, GATHER = ("hvd.allreduce", "mpi.Allreduce"), ("hvd.allgather",)  # the rest: point-to-point
WORLDS = (2, 4, 8, 64, 512)


# --- statistics and formatting -------------------------------------------------------------------

def quartiles(samples):
    return tuple(float(np.percentile(samples, f)) for f in (25, 50, 75))


def median(samples):
    return quartiles(samples)[1]


def paired(a, b, op):
    return [op(x, y) for x, y in zip(a, b)]


def t(seconds):
    if abs(seconds) < 1e-3:
        return f"{seconds * 1e6:.1f} µs"
    return f"{seconds * 1e3:.2f} ms" if abs(seconds) < 1 else f"{seconds:.2f} s"


def t_iqr(samples):
    q1, q2, q3 = quartiles(samples)
    return f"{t(q2)} ({t(q1)} – {t(q3)})"


def r_iqr(samples):
    q1, q2, q3 = quartiles(samples)
    return f"{q2:.3f} ({q1:.3f} – {q3:.3f})"


def size(n):
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]) + "\n"


def verdict(ok):
    return "**met**" if ok else "**missed**"


def permutation_twin(variant):
    """The shuffle-<transport> variant an others-<transport> one is compared with (else None)."""
    return "shuffle-" + variant[len("others-"):] if variant in OTHERS else None


def packet_bytes(variant, c):
    """Bytes of one layer's exchange packets per step, sent + received, forward + backward
    (float64): shuffle: 2C+1 moved and 2C+5 summed forward, 2C moved back; others: 2C+5 summed
    forward, 2C summed backward."""
    if variant in OTHERS:
        return 8 * ((2 * c + 5) * 2 + 2 * c * 2)
    return 8 * ((2 * c + 1) * 2 + (2 * c + 5) * 2 + 2 * c * 2)


# --- loading -------------------------------------------------------------------------------------

def load(results):
    runs = {p.stem: json.loads(p.read_text()) for p in sorted(results.glob("*.json"))
            if p.name not in ("runs.json", NETWORK)}
    manifest = results / "runs.json"
    return runs, (json.loads(manifest.read_text()) if manifest.exists() else {})


def mains(runs):
    """The parts of the runs at default settings (not the sweep, not the control), merged by rank
    count: e.g. micro-2 and macro-2 make one entry for 2 ranks."""
    merged = {}
    for label, r in sorted(runs.items()):
        if label.startswith(("sweep-", HOST_COST)) or not r["meta"].get("horovod_initialised",
                                                                          True):
            continue
        entry = merged.setdefault(r["meta"]["ranks"], {})
        entry.update({k: v for k, v in r.items() if k in ("micro", "macro", "bytes")})
        entry.setdefault("meta", r["meta"])
    return {k: v for k, v in sorted(merged.items()) if "micro" in v or "macro" in v}


def controls(runs):
    """Micro runs without Horovod (mpi4py only), by rank count."""
    return {r["meta"]["ranks"]: r for r in runs.values()
            if not r["meta"].get("horovod_initialised", True)}


# --- sections ------------------------------------------------------------------------------------

def measures_others(run):
    """Whether a bench.py result has an others-* variant anywhere."""
    names = set(run.get("micro", {}).get("samples", {}))
    for model in run.get("macro", {}).values():
        names |= set(model.get("train", {})) | set(model.get("keyfwd", {}))
    for variants in run.get("bytes", {}).values():
        names |= set(variants)
    return bool(names & set(OTHERS))


def machine_section(runs, manifest):
    meta = next(iter(runs.values()))["meta"]
    out = ["## Machine and commands\n",
           f"- CPU: {meta['cpu']}, {meta['cores']} cores; torch {meta['torch']} "
           f"({meta['threads']} thread per rank), Horovod {meta['horovod']} "
           f"(MPI controller: {meta['mpi_enabled']}), Python {meta['python']}.",
           f"- ShuffleBatchNorm transports measured: {', '.join(meta['transports'])}; "
           f"SyncBN baseline from examples/sync_batchnorm.py: {meta['syncbn']}. Modes: "
           "`shuffle-<transport>` borrows the statistics of one other group (`borrow_from="
           "\"permutation\"`, the default)" + (
               "; `others-<transport>` those of all the other groups pooled (`borrow_from="
               "\"others\"`)" if any(measures_others(r) for r in runs.values()) else "") + ".",
           "- Horovod defaults (0.28.1): HOROVOD_CYCLE_TIME 1 ms, HOROVOD_FUSION_THRESHOLD "
           "128 MiB, HOROVOD_CACHE_CAPACITY 1024; every run not in the sweep uses them.",
           "- Ranks oversubscribe 2 cores at 4 and 8 ranks; other jobs shared the machine "
           "(load averages below), so only ratios measured in the same run are compared.\n"]
    rows = []
    for label, r in sorted(runs.items()):
        m = r["meta"]
        rows.append([label, m["ranks"], " ".join(f"{k}={v}" for k, v in m["env"].items()
                                                   if not k.startswith("OMPI_MCA_rmaps")
                                                   and k != "OMPI_MCA_mpi_oversubscribe") or "-",
                     m.get("library", "?"), f"{m['seconds']:.0f} s", " / ".join(m["loadavg_start"][:1] + m["loadavg_end"][:1]),
                     f"`{manifest.get(label, {}).get('command', ' '.join(m['argv']))}`"])
    out.append(table(["run", "ranks", "settings", "library", "time", "load avg start / end",
                      "command"], rows))
    versions = {r["meta"].get("library") for r in runs.values()}
    if len(versions) > 1:
        out.append(f"**Warning:** the runs measured {len(versions)} different versions of "
                   "hvd_shufflebn (column *library*, a hash of its sources).\n")
    return "\n".join(out)


def micro_section(main_runs):
    out = ["## Micro: one layer, forward + backward\n"]
    goals = {}
    for ranks, r in main_runs.items():
        micro = r.get("micro")
        if not micro:
            continue
        s = micro["samples"]
        n, c, h, w = micro["shape"]
        out.append(f"### {ranks} ranks, input ({n}, {c}, {h}, {w}) per rank, "
                   f"{len(s['bn'])} rounds of {micro['inner']} calls\n")
        out.append("Raw primitives use the layer's packet sizes: forward moves 2C+1 = "
                   f"{2 * c + 1} float64 to one rank and sums 2C+5 = {2 * c + 5} over all ranks, "
                   f"backward moves 2C = {2 * c} back. *floor* = the layer's whole pattern with "
                   "raw calls: the forward exchange (both collectives; Horovod: submitted together) "
                   "plus the backward exchange. *floor-others* = the pattern of "
                   "`borrow_from=\"others\"` (`others-*`): the same sum of 2C+5 forward, a sum of "
                   f"2C = {2 * c} backward, no move.\n")
        out.append(table(["op", "median (IQR)"], [[k, t_iqr(v)] for k, v in s.items()]))
        rows = []
        for shuffle in LAYERS:
            if shuffle not in s or FLOOR[shuffle] not in s:
                continue
            overhead = paired(s[shuffle], s["bn"], float.__sub__)
            floor = s[FLOOR[shuffle]]
            in_situ = paired(s["bn+" + FLOOR[shuffle]], s["bn"], float.__sub__)
            ratio = median(overhead) / median(floor)
            goals[(shuffle, ranks)] = (ratio, median(overhead), median(floor), median(in_situ))
            own = exchange = ["-"]
            local = ("others-local" if shuffle in OTHERS else "shuffle-local")
            if local in s:
                own = paired(s[local], s["bn"], float.__sub__)
                exchange = paired(s[shuffle], s[local], float.__sub__)
            rows.append([shuffle, t_iqr(s[shuffle]), t_iqr(s["bn"]), t_iqr(overhead), t_iqr(floor),
                         f"{ratio:.2f}", verdict(ratio <= 2), t_iqr(in_situ),
                         t_iqr(own) if own != ["-"] else "-",
                         t_iqr(exchange) if exchange != ["-"] else "-"])
        if "syncbn" in s:
            overhead = paired(s["syncbn"], s["bn"], float.__sub__)
            rows.append(["syncbn (example)", t_iqr(s["syncbn"]), t_iqr(s["bn"]), t_iqr(overhead)]
                        + ["-"] * 6)
        out.append(table(["layer", "layer fwd+bwd", "BatchNorm2d fwd+bwd", "overhead (paired)",
                          "raw floor (tight loop)", "overhead / floor", "goal: <= 2x floor",
                          "raw calls around a BN: overhead", "own math: local - BN",
                          "exchange: layer - local"], rows))
        out.append("*raw calls around a BN* = BatchNorm2d forward, the transport's forward calls, "
                   "BatchNorm2d backward, its backward call, minus BatchNorm2d alone (paired): the "
                   "same waits for the partner rank that the layer has, without any of its code. "
                   "*local* = the layer's autograd Function with a transport that communicates "
                   "nothing (`shuffle-local`; `others-local` for `others-*`): its own math and "
                   "Python; *exchange* = the rest.\n")
        rows = []
        for others in OTHERS:
            shuffle = permutation_twin(others)
            if others in s and shuffle in s:
                rows.append([others[len("others-"):],
                             t_iqr(paired(s[others], s["bn"], float.__sub__)),
                             t_iqr(paired(s[shuffle], s["bn"], float.__sub__)),
                             t_iqr(paired(s[others], s[shuffle], float.__sub__)),
                             r_iqr(paired(s[others], s[shuffle], float.__truediv__))])
        if rows:
            out.append("Borrowing from all the others (`others-*`) against one other group "
                       "(`shuffle-*`), same transport, paired per round (< 1: others is "
                       "cheaper):\n")
            out.append(table(["transport", "others: overhead over BN", "shuffle: overhead over BN",
                              "others - shuffle", "others / shuffle (layer time)"], rows))
    return "\n".join(out), goals


def control_section(control_runs):
    if not control_runs:
        return ""
    rows = []
    for ranks, r in sorted(control_runs.items()):
        s = r["micro"]["samples"]
        around = paired(s["bn+mpi.floor"], s["bn"], float.__sub__)
        rows.append([ranks, t_iqr(s["mpi.floor"]), t_iqr(s["bn"]), t_iqr(around)])
    return ("### Control: mpi4py without Horovod initialised\n\n"
            "Same micro loop in a launch that never calls hvd.init() (no Horovod background "
            "thread): if the raw calls still cost more around a BN than in a tight loop, the "
            "difference is the two ranks waiting for each other (scheduling), not Horovod.\n\n"
            + table(["ranks", "mpi floor (tight loop)", "BatchNorm2d fwd+bwd",
                     "raw mpi calls around a BN: overhead"], rows))


def memory_section(main_runs):
    micro = main_runs[min(main_runs)].get("micro") if main_runs else None
    if not micro:
        return "", {}
    c = micro["shape"][1]
    packets = packet_bytes("shuffle-mpi", c)  # sent + received, fwd + bwd
    mem = micro["memory"]
    bn_new = mem["bn"]["new_bytes"]
    rows, goals = [], {}
    for name, m in mem.items():
        rows.append([name, " ".join("x".join(map(str, s)) or "scalar" for s in m["saved"]),
                     " ".join("x".join(map(str, s)) for s in m["new"]), size(m["new_bytes"]),
                     f"{m['new_bytes'] - bn_new:+d} B"])
        if name in LAYERS:
            goals[name] = (m["new_bytes"], bn_new, packet_bytes(name, c))
    text = ["## Memory kept for backward (one layer)\n",
            "Tensors saved for backward (autograd saved-tensor hooks); *new* = not the input, a "
            "parameter or a buffer, i.e. memory that exists only because of the layer. The "
            f"exchange's packets are transient: {size(packets)} per layer and step at C = {c} "
            "(float64; forward and backward, sent and received); "
            f"{size(packet_bytes('others-mpi', c))} with `borrow_from=\"others\"`.\n",
            table(["layer", "saved tensors (shapes)", "new", "new bytes", "vs BatchNorm2d"], rows)]
    return "\n".join(text), goals


def host_cost_section(runs):
    """host_cost.py's runs: per call host time and aten ops, beside BatchNorm2d's."""
    out = ["## Host cost per layer call (tiny input: what is left is the host's own work)\n",
           "On a GPU the Python thread only queues kernels, so this is what a layer adds to a "
           "launch-bound step. Ratios are per round (BatchNorm2d and the variant back to back), "
           "then the median. One process: `groups_per_rank=2`, `transport=\"local\"`; several "
           "ranks: each transport with `groups_per_rank=1`.\n"]
    rows, goals = [], []
    for label, r in sorted(runs.items()):
        if not label.startswith(HOST_COST):
            continue
        meta, secs = r["meta"], r["seconds"]
        for key, samples in secs.items():
            name, what = key.split("/")
            if name == "bn":
                continue
            ratio = paired(samples, secs[f"bn/{what}"], float.__truediv__)
            ops, bn_ops = r["ops"][key], r["ops"][f"bn/{what}"]
            rows.append([meta["ranks"], name, "forward+backward" if what == "train" else
                         "no-grad forward", t_iqr(samples), t_iqr(secs[f"bn/{what}"]),
                         r_iqr(ratio), f"{ops} ({bn_ops})"])
            if meta["ranks"] == 1 and what in HOST_GOALS:
                max_ops, max_ratio = HOST_GOALS[what]
                title = "forward+backward" if what == "train" else "no-grad forward"
                goals.append([f"one process, {title}: aten ops <= {max_ops}", str(ops),
                              verdict(ops <= max_ops)])
                goals.append([f"one process, {title}: host time <= {max_ratio:g}x BatchNorm2d",
                              f"{median(ratio):.2f}x", verdict(median(ratio) <= max_ratio)])
        line = (f"{meta['machine']}, torch {meta['torch']}, {meta['threads']} thread, input "
                f"{tuple(meta['shape'])} per rank, {meta['rounds']} rounds of {meta['calls']} "
                "calls. At 2 ranks a call's time includes its exchanges' waits for the other rank.\n")
        if line not in out:
            out.append(line)
    if not rows:
        return "", []
    out.insert(1, table(["ranks", "variant", "call", "host time", "BatchNorm2d", "ratio",
                         "aten ops (BatchNorm2d)"], rows))
    return "\n".join(out), goals


def macro_section(main_runs):
    out = ["## Macro: ResNet-style training steps and key-encoder forwards\n",
           "Every variant's gradients are allreduced by hvd.DistributedOptimizer (SGD). *ratio* = "
           "the variant's time over plain BatchNorm's in the same round (median, IQR). A key-encoder "
           "forward runs in train mode under torch.no_grad() (MoCo's key encoder), so ShuffleBatchNorm "
           "and SyncBN pay only their forward exchange there; sample shuffling (MoCo's official "
           "code) applies to the key encoder only.\n"]
    goals = {}
    models = sorted({m for r in main_runs.values() for m in r.get("macro", {})})
    for model in models:
        for what, title in (("train", "training step"), ("keyfwd", "key-encoder forward")):
            rows = []
            per_ranks = {k: r["macro"][model] for k, r in main_runs.items() if model in r.get("macro", {})}
            first = next(iter(per_ranks.values()))
            header = ["variant"]
            for ranks in per_ranks:
                header += [f"{ranks} ranks: time", "steps/s", "ratio to BN"]
            for variant in first[what]:
                row = [variant]
                for ranks, m in per_ranks.items():
                    s = m[what][variant]
                    ratio = paired(s, m[what]["bn"], float.__truediv__)
                    row += [t_iqr(s), f"{1 / median(s):.2f}", r_iqr(ratio)]
                    goals[(model, what, variant, ranks)] = ratio
                rows.append(row)
            out.append(f"### {model}, {title} (batch {first['batch']} per rank, "
                       f"{first['image']}x{first['image']}, {first['bn_layers']} BN layers, "
                       f"{len(first[what]['bn'])} timed rounds)\n")
            out.append(table(header, rows))
        # ShuffleBatchNorm against each baseline, paired.
        rows = []
        for ranks, r in main_runs.items():
            m = r.get("macro", {}).get(model)
            if not m:
                continue
            for shuffle in LAYERS:
                for what in ("train", "keyfwd"):
                    if shuffle not in m[what]:
                        continue
                    cells = []
                    for base in BASELINES:
                        if base in m[what]:
                            ratio = paired(m[what][shuffle], m[what][base], float.__truediv__)
                            goals[(model, what, shuffle, base, ranks)] = ratio
                            cells.append(r_iqr(ratio))
                        else:
                            cells.append("-")
                    twin = permutation_twin(shuffle)
                    cells.append(r_iqr(paired(m[what][shuffle], m[what][twin], float.__truediv__))
                                 if twin in m[what] else "-")
                    rows.append([ranks, shuffle, what] + cells)
        out.append(f"### {model}: ShuffleBatchNorm time / baseline time (< 1: ShuffleBatchNorm is ahead)\n")
        header = ["ranks", "layer", "measure"] + list(BASELINES)
        if any(row[-1] != "-" for row in rows):  # an others-* variant was measured
            header.append("shuffle-* (same transport)")
        else:
            rows = [row[:-1] for row in rows]
        out.append(table(header, rows))
    return "\n".join(out), goals


def bn_bytes(counts):
    """Bytes of the BatchNorm variant's own collectives (gradient allreduces left out: the same in
    every variant), by collective kind."""
    return {k: v for k, v in counts.items() if k != "grad.allreduce"}


def wire(kind, submitted, p):
    """Bytes a rank puts on the wire for ``submitted`` bytes: point-to-point as is; allreduce with a
    bandwidth-optimal ring, 2(p-1)/p of it; allgather (p-1) times (its block reaches p-1 ranks)."""
    if kind in SUM:
        return 2 * (p - 1) / p * submitted
    if kind in GATHER:
        return (p - 1) * submitted
    return submitted


def bytes_section(runs):
    by_model = {}
    for r in runs.values():
        for model, variants in r.get("bytes", {}).items():
            by_model.setdefault(model, {})[r["meta"]["ranks"]] = variants
    if not by_model:
        return "", {}
    layers = {m: r["macro"][m]["bn_layers"] for r in runs.values() for m in r.get("macro", {})}
    out = ["## Bytes per rank\n",
           "Counted by wrapping Horovod's collectives and the mpi transport's communicator: bytes a "
           "rank submits (*sent*) and gets back (*received*) per step, for the BatchNorm variant's "
           "own collectives, per step (per layer: divide by the number of BN layers; the gradient allreduce, identical in every variant, is left out; it is "
           "listed last). *wire* = bytes a rank sends on the network under the usual algorithms "
           "(point-to-point as is; allreduce as a ring: 2(p-1)/p of the vector; allgather: its block "
           "to p-1 ranks), from the measured sizes; 64 and 512 ranks are computed.\n"]
    goals = {}
    for model, per_ranks in sorted(by_model.items()):
        n_layers = layers.get(model)
        rows = []
        variants = next(iter(per_ranks.values()))
        smallest = min(per_ranks)
        for variant in variants:
            for what in ("train", "keyfwd"):
                if what not in variants[variant]:
                    continue
                row = [variant, what]
                per_layer = []
                for ranks in sorted(per_ranks):
                    counts = bn_bytes(per_ranks[ranks][variant].get(what, {}))
                    sent = sum(v["sent"] for v in counts.values())
                    received = sum(v["received"] for v in counts.values())
                    row.append(f"{size(sent)} / {size(received)}")
                    per_layer.append((sent, received))  # per step; per layer in the goals
                base = bn_bytes(per_ranks[smallest][variant].get(what, {}))
                if n_layers:  # what one layer costs a rank per step, at the smallest world
                    sent, received = per_layer[0]
                    row.append("-" if variant == "sample-shuffle" else  # per forward, not layer
                               f"{size(sent / n_layers)} / {size(received / n_layers)}")
                for p in WORLDS:
                    row.append(size(sum(wire(k, v["sent"], p) for k, v in base.items())))
                goals[(model, variant, what)] = (sorted(per_ranks), per_layer, n_layers or 1)
                rows.append(row)
        grads = per_ranks[smallest]["bn"]["train"].get("grad.allreduce", {"sent": 0})["sent"]
        rows.append(["(gradient allreduce, all)", "train"] + [size(grads)] * len(per_ranks)
                    + ["-"] * bool(n_layers)
                    + [size(wire("hvd.allreduce", grads, p)) for p in WORLDS])
        header = (["variant", "measure"] + [f"{p} ranks: sent / received" for p in sorted(per_ranks)]
                  + [f"per layer, {smallest} ranks"] * bool(n_layers)
                  + [f"wire, p={p}" for p in WORLDS])
        out.append(f"### {model} ({n_layers} BN layers)\n")
        out.append(table(header, rows))
    out.append("Small vectors are usually summed by recursive doubling rather than a ring "
               "(Open MPI picks it below a few KiB): log2(p) times the vector per rank, i.e. "
               f"x{math.log2(64):.0f} at 64 ranks and x{math.log2(512):.0f} at 512 instead of "
               "<= x2. That applies to the 2C+5-value allreduce of ShuffleBatchNorm, to both "
               "allreduces of `borrow_from=\"others\"` (`others-*`: 2C+5 values forward, 2C "
               "backward, no point-to-point move) and to both allreduces of SyncBN alike.\n")
    return "\n".join(out), goals


def sweep_section(runs):
    # "sweep-<setting>" and its repeat "sweep-<setting>-r2": ratios pooled over both launches.
    sweep = {}
    for label, r in sorted(runs.items()):
        if label.startswith("sweep-"):
            sweep.setdefault(label[len("sweep-"):].removesuffix("-r2"), []).append(r)
    if not sweep:
        return "", {}
    rows, data = [], {}
    for label, repeats in sweep.items():
        r = repeats[0]
        train = r["macro"]["resnet18"]["train"]
        micro = r["micro"]["samples"]
        row = [label, " ".join(f"{k}={v}" for k, v in r["meta"]["env"].items()
                               if not k.startswith("OMPI_MCA_rmaps") and k != "OMPI_MCA_mpi_oversubscribe") or "-",
               " / ".join(t(median(x["macro"]["resnet18"]["train"]["bn"])) for x in repeats)]
        data[label] = {"bn": median(train["bn"])}
        for shuffle in SHUFFLES:
            if shuffle in train:
                per_launch = [paired(x["macro"]["resnet18"]["train"][shuffle],
                                     x["macro"]["resnet18"]["train"]["bn"], float.__truediv__)
                              for x in repeats]
                pooled = sum(per_launch, [])
                data[label][shuffle] = quartiles(pooled)
                row += [" / ".join(t(median(x["macro"]["resnet18"]["train"][shuffle])) for x in repeats),
                        r_iqr(pooled) + " [" + " / ".join(f"{median(p):.2f}" for p in per_launch) + "]"]
            else:
                row += ["-", "-"]
        for op in ("hvd.floor", "mpi.floor", "mpi.Allreduce", "mpi.Sendrecv"):
            row.append(t(median(micro[op])) if op in micro else "-")
        for shuffle in SHUFFLES:
            if shuffle in micro:
                row.append(t(median(paired(micro[shuffle], micro["bn"], float.__sub__))))
            else:
                row.append("-")
        around = "bn+mpi.floor"
        row.append(t(median(paired(micro[around], micro["bn"], float.__sub__))) if around in micro else "-")
        rows.append(row)
    header = ["setting", "env", "BN step", "shuffle-horovod step", "ratio to BN [per launch]",
              "shuffle-mpi step", "ratio to BN [per launch]", "hvd floor", "mpi floor", "mpi Allreduce",
              "mpi Sendrecv", "layer overhead horovod", "layer overhead mpi",
              "raw mpi calls around a BN"]
    text = ["## Horovod settings (ResNet-18-style training step, 2 ranks)\n",
            "One launch per setting (Horovod reads them at hvd.init()), one setting changed at a "
            "time from the defaults; the whole sweep runs twice, the second time in reverse order "
            "(step times: first / second launch). Step times are not comparable across launches "
            "(the machine's load moves between them); the ratios within a launch are, and are pooled "
            "over both launches (per-launch medians in brackets). The micro columns come from the "
            "first launch (fewer rounds than the main runs).\n",
            table(header, rows)]
    return "\n".join(text), data


def goals_section(micro_goals, macro_goals, bytes_goals, memory_goals, host_goals):
    out = ["## Goals\n"]
    rows = list(host_goals)
    for (shuffle, ranks), (ratio, overhead, floor, in_situ) in sorted(micro_goals.items()):
        rows.append([f"per-layer overhead <= 2x raw floor, {shuffle}, {ranks} ranks",
                     f"{t(overhead)} vs floor {t(floor)}: {ratio:.2f}x (raw calls around a BN: "
                     f"{t(in_situ)}, {overhead / in_situ:.2f}x that)", verdict(ratio <= 2)])
    for model, what, label, bound in STEP_GOALS:
        for shuffle in LAYERS:
            ratio = macro_goals.get((model, what, shuffle, 2))
            if ratio:
                rows.append([f"{label} within {bound:.2f}x of BN, {shuffle}, 2 ranks",
                             f"{median(ratio):.3f}x (IQR {quartiles(ratio)[0]:.3f} – "
                             f"{quartiles(ratio)[2]:.3f})", verdict(median(ratio) <= bound)])
    ahead = {}
    for key, ratio in macro_goals.items():
        if len(key) == 5:
            model, what, shuffle, base, ranks = key
            ahead.setdefault((model, what, ranks, shuffle), []).append((base, median(ratio)))
    for (model, what, ranks, shuffle), ratios in sorted(ahead.items()):
        rows.append([f"ahead of the baselines: {model} {what}, {shuffle}, {ranks} ranks",
                     ", ".join(f"{r:.2f}x {base}'s time" for base, r in ratios),
                     verdict(all(r < 1 for _, r in ratios))])
    for (model, variant, what), (worlds, per_step, n_layers) in sorted(bytes_goals.items()):
        if variant in LAYERS:
            constant = len(set(per_step)) == 1
            sent, received = per_step[0]
            rows.append([f"bytes per rank per layer constant in world size: {model} {variant} {what}",
                         f"{size(sent / n_layers)} sent / {size(received / n_layers)} received per "
                         f"layer at {', '.join(map(str, worlds))} ranks" if constant else
                         f"varies: {per_step}",
                         verdict(constant) if len(worlds) > 1 else "n/a (one world size)"])
    for shuffle, (new, bn_new, packets) in memory_goals.items():
        rows.append([f"no memory beyond BN's saved tensors + packets, {shuffle}",
                     f"{size(new)} new saved vs BN's {size(bn_new)}; transient packets {size(packets)}",
                     verdict(new <= bn_new + packets)])
    out.append(table(["goal", "measured", "verdict"], rows))
    return "\n".join(out)


# --- chart ---------------------------------------------------------------------------------------

def chart(path, micro_goals, macro_goals, sweep_data):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.8))
    ax = axes[0]
    labels = sorted(micro_goals, key=lambda k: (k[1], LAYERS.index(k[0])))
    x = np.arange(len(labels))
    ax.bar(x - 0.2, [micro_goals[k][1] * 1e6 for k in labels], 0.4, label="layer overhead")
    ax.bar(x + 0.2, [micro_goals[k][2] * 1e6 for k in labels], 0.4, label="raw floor")
    ax.scatter(x, [2 * micro_goals[k][2] * 1e6 for k in labels], marker="_", s=900, color="k",
               label="goal: 2x raw floor")
    ax.set_xticks(x, [f"{k[0]}\n{k[1]} ranks" for k in labels], fontsize=7)
    if any(micro_goals[k][i] > 0 for k in labels for i in (1, 2)):
        ax.set_yscale("log")  # (not without a positive value: no micro run, or all noise)
    ax.set_ylabel("µs per layer fwd+bwd (median)")
    ax.set_title("Per-layer exchange overhead vs raw floor")
    ax.legend(loc="lower left", fontsize=8)

    ax = axes[1]
    groups = sorted({(k[0], k[3]) for k in macro_goals if len(k) == 4 and k[1] == "train"})
    variants = [v for v in LAYERS + ("syncbn", "original")
                if any(len(k) == 4 and k[2] == v for k in macro_goals)]
    width = 0.8 / max(1, len(variants))
    for i, v in enumerate(variants):
        qs = [quartiles(macro_goals[(m, "train", v, r)]) if (m, "train", v, r) in macro_goals
              else (math.nan,) * 3 for m, r in groups]
        mids = np.array([q[1] for q in qs])
        err = np.array([[q[1] - q[0] for q in qs], [q[2] - q[1] for q in qs]])
        ax.bar(np.arange(len(groups)) + (i - (len(variants) - 1) / 2) * width, mids, width,
               yerr=err, capsize=2, label=v)
    ax.axhline(1.05, color="k", ls="--", lw=1, label="ResNet-18 goal 1.05x")
    ax.axhline(1.15, color="k", ls=":", lw=1, label="thin network goal 1.15x")
    ax.set_xticks(np.arange(len(groups)), [f"{m}\n{r} ranks" for m, r in groups])
    ax.set_ylabel("training step time / plain BN (median, IQR)")
    ax.set_title("Training step vs plain BatchNorm")
    ax.legend(fontsize=8)

    ax = axes[2]
    if sweep_data:
        names = list(sweep_data)
        for i, shuffle in enumerate(SHUFFLES):
            qs = [sweep_data[n].get(shuffle, (math.nan,) * 3) for n in names]
            ax.bar(np.arange(len(names)) + (i - 0.5) * 0.4, [q[1] for q in qs], 0.4,
                   yerr=np.array([[q[1] - q[0] for q in qs], [q[2] - q[1] for q in qs]]),
                   capsize=2, label=shuffle)
        ax.axhline(1.05, color="k", ls="--", lw=1)
        ax.set_xticks(np.arange(len(names)), names, rotation=30, ha="right")
        ax.set_ylabel("ResNet-18 step / plain BN, 2 ranks")
        ax.set_title("Horovod settings")
        ax.legend(fontsize=8)
    else:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def network_text(results, out):
    """The shaped-network section and network.png, if network.py has run."""
    path = results / NETWORK
    if not path.exists():
        return ""
    import cost_model
    network = json.loads(path.read_text())
    text = cost_model.section(network)[0]
    try:
        cost_model.plot(network, out / "network.png")
    except ImportError:
        return text
    return text + "\n![network](network.png)\n"


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--results", default=str(HERE / "results"))
    p.add_argument("--out", default=str(HERE))
    args = p.parse_args()
    runs, manifest = load(Path(args.results))
    if not runs:
        raise SystemExit(f"no results in {args.results}")
    main_runs = mains(runs)
    micro_text, micro_goals = micro_section(main_runs)
    micro_text += "\n" + control_section(controls(runs))
    memory_text, memory_goals = memory_section(main_runs)
    macro_text, macro_goals = macro_section(main_runs)
    bytes_text, bytes_goals = bytes_section(runs)
    sweep_text, sweep_data = sweep_section(runs)
    host_text, host_goals = host_cost_section(runs)
    out = Path(args.out)
    has_chart = chart(out / "results.png", micro_goals, macro_goals, sweep_data)
    notes = HERE / "notes.md"
    parts = ["# ShuffleBatchNorm benchmark results\n",
             "Generated by `benchmarks/report.py` from `benchmarks/results/*.json` "
             "(`make bench` runs everything). Medians with interquartile ranges in parentheses.\n",
             "![results](results.png)\n" if has_chart else "(matplotlib missing: no chart)\n",
             goals_section(micro_goals, macro_goals, bytes_goals, memory_goals, host_goals),
             notes.read_text() if notes.exists() else "",
             network_text(Path(args.results), out),
             machine_section({k: v for k, v in runs.items() if not k.startswith(HOST_COST)},
                             manifest), host_text, micro_text, memory_text, macro_text, bytes_text,
             sweep_text]
    (out / "RESULTS.md").write_text("\n".join(p for p in parts if p))
    print(f"wrote {out / 'RESULTS.md'}" + (f" and {out / 'results.png'}" if has_chart else ""))


if __name__ == "__main__":
    main()

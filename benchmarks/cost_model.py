"""A latency-bandwidth cost model of MoCo's key-encoder forward, fitted to the shaped-network run
(results/network.json from network.py) and used to predict ResNet-50 at 8, 64 and 512 ranks; and
the same model for the BN exchanges of a training step (forward + backward).

Messages cost alpha + bytes * beta (fitted per link rate to the ping-pong between the two hosts).
Per key forward on p ranks, N images of H x W per rank, BN layers of widths C, feature dim D:

  sample shuffling   two ring allgathers (MoCo's concat_all_gather), of the images and of the
                     features:  (p-1) (2 alpha + (n_img + n_feat) beta), n_img = 12 N H W bytes
  SyncBN             one allreduce of 2C+1 float32 per layer, without Horovod's cycle (as a
                     NCCL or MPI SyncBN; examples/sync_batchnorm.py makes the same allreduce; NCCL's
                     and MPI's small allreduces are recursive doubling): ceil(log2 p) (alpha + 4 (2C+1) beta)
  ShuffleBatchNorm   per layer, started together and waited for once: an allreduce of 2C+5
                     float64 (recursive doubling) and one row of 2C+1 float64 to one rank:
                     ceil(log2 p) (alpha + 8 (2C+5) beta)
                     + o_mpi per layer (mpi transport), or + 1 ms (Horovod's negotiation cycle)
                     + o_hvd per layer (horovod transport)
  ShuffleBatchNorm,  borrow_from="others" (others-*): the same allreduce of 2C+5 float64 and no
  pooled             move: ceil(log2 p) (alpha + 8 (2C+5) beta) + the transport's overhead
                     (+ 1 ms per layer with Horovod)
The software overheads o_* (per layer) and the copies of sample shuffling are fitted to the
measured communication time (variant - plain BN, paired) as the median residual over all points;
a variant the shaped-network run did not measure takes the overhead of its transport's
shuffle-* variant.

Training step (forward + backward), the BN layers' exchanges only (the gradient allreduce is the
same for every variant), per layer: the forward as above, plus in the backward
  SyncBN             an allreduce of 2C float32:      ceil(log2 p) (alpha + 4 (2C) beta)
  shuffle-*          one row of 2C float64 back:      alpha + 8 (2C) beta
  others-*           an allreduce of 2C float64:      ceil(log2 p) (alpha + 8 (2C) beta)
each exchange with the fitted per-layer overhead again (and Horovod's 1 ms cycle again).
"""
import json
import math
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from report import median, size, t, table  # noqa: E402  (RESULTS.md's formatting)

FEATURES = 128                      # the encoder's output (MoCo's embedding)
PREDICT_RANKS = (8, 64, 512)
PREDICT_RATES = (10, 25, 100)       # Gbit/s
RESNET50 = {"batch": 32, "image": 224}
DATACENTER_LATENCY = 10e-6          # seconds per message: TCP on a datacenter NIC (RDMA: ~2 us)
HOROVOD_CYCLE = 1e-3                # HOROVOD_CYCLE_TIME's default
VARIANTS = ("sample-shuffle", "syncbn", "shuffle-mpi", "shuffle-horovod", "others-mpi",
            "others-horovod")
STEP_VARIANTS = VARIANTS[1:]        # sample shuffling touches only the key encoder: no step


def allreduce_seconds(p, values, itemsize, alpha, beta):
    """A small vector summed over p ranks by recursive doubling (NCCL's and MPI's choice below a
    few KiB): ceil(log2 p) steps, each one message of the whole vector."""
    return log2(p) * (alpha + itemsize * values * beta)


def resnet50_bn_channels():
    from torch import nn
    from models import MODELS
    return [m.num_features for m in MODELS["resnet50"]().modules() if isinstance(m, nn.BatchNorm2d)]


def fit_link(link):
    """(alpha seconds, beta seconds per byte): alpha the one-way time of the smallest messages
    (<= 16 KiB, median), beta the least-squares slope over the large ones (>= 1 MiB), where the
    bandwidth shows and the latency is noise."""
    small = [t for size, t in link.items() if int(size) <= 1 << 14]
    beta = least_squares([(float(size), t) for size, t in link.items() if int(size) >= 1 << 20])[0]
    return median(small), max(beta, 1e-15)


def log2(p):
    return math.ceil(math.log2(p)) if p > 1 else 0


def network_seconds(variant, p, batch, image, channels, alpha, beta, kappa=1.0):
    """Time on the wire per key forward (no software overhead). ``kappa``: how many times the
    ideal ring's bytes sample shuffling's allgathers put through the slowest link (fitted)."""
    if variant == "sample-shuffle":
        n = 12 * batch * image * image + 4 * batch * FEATURES
        return (p - 1) * (2 * alpha + kappa * n * beta)
    if variant == "syncbn":
        return sum(allreduce_seconds(p, 2 * c + 1, 4, alpha, beta) for c in channels)
    # shuffle-* and others-*: the same sum; shuffle's row to one rank overlaps it.
    wire = sum(allreduce_seconds(p, 2 * c + 5, 8, alpha, beta) for c in channels)
    # Horovod starts a collective at its next negotiation cycle: one cycle per layer.
    return wire + (len(channels) * HOROVOD_CYCLE if variant.endswith("-horovod") else 0.0)


def backward_network_seconds(variant, p, channels, alpha, beta):
    """Time on the wire of the backward's exchanges per training step (no software overhead)."""
    if variant == "syncbn":
        wire = sum(allreduce_seconds(p, 2 * c, 4, alpha, beta) for c in channels)
    elif variant.startswith("others-"):
        wire = sum(allreduce_seconds(p, 2 * c, 8, alpha, beta) for c in channels)
    else:  # shuffle-*: one row back to the rank that lent the statistics
        wire = sum(alpha + 8 * 2 * c * beta for c in channels) if p > 1 else 0.0
    return wire + (len(channels) * HOROVOD_CYCLE if variant.endswith("-horovod") else 0.0)


def bytes_received(variant, p, batch, image, channels):
    """Bytes each rank receives per key forward."""
    if variant == "sample-shuffle":
        return (p - 1) * (12 * batch * image * image + 4 * batch * FEATURES)
    if variant == "syncbn":
        return sum(log2(p) * 4 * (2 * c + 1) for c in channels)
    if variant.startswith("others-"):
        return sum(log2(p) * 8 * (2 * c + 5) for c in channels)
    return sum(log2(p) * 8 * (2 * c + 5) + 8 * (2 * c + 1) for c in channels)


def step_bytes_received(variant, p, channels):
    """Bytes each rank receives per training step in the BN layers' exchanges."""
    forward = bytes_received(variant, p, 0, 0, channels)
    if variant == "syncbn":
        return forward + sum(log2(p) * 4 * 2 * c for c in channels)
    if variant.startswith("others-"):
        return forward + sum(log2(p) * 8 * 2 * c for c in channels)
    return forward + sum(8 * 2 * c for c in channels)


def measured(network):
    """[(rate, image, variant, communication seconds per key forward)] from network.json."""
    out = []
    for s in network["settings"]:
        for image, times in s["keyfwd"].items():
            for variant, samples in times.items():
                if variant != "bn":
                    comm = [a - b for a, b in zip(samples, times["bn"])]
                    out.append((s["rate_gbit"], int(image), variant, median(comm)))
    return out


def fit(network):
    """Link parameters per rate and the per-layer / per-forward software overheads."""
    links = {s["rate_gbit"]: fit_link(s["link"]) for s in network["settings"]}
    first = network["settings"][0]
    p, batch, channels = first["ranks"], first["batch"], first["bn_channels"]
    residuals, shuffled = {}, []
    for rate, image, variant, comm in measured(network):
        alpha, beta = links[rate]
        if variant == "sample-shuffle":  # comm - latency = overhead + kappa * ideal bytes time
            ideal = network_seconds(variant, p, batch, image, channels, 0.0, beta)
            shuffled.append((ideal, comm - network_seconds(variant, p, batch, image, channels,
                                                           alpha, 0.0)))
            continue
        wire = network_seconds(variant, p, batch, image, channels, alpha, beta)
        residuals.setdefault(variant, []).append((comm - wire) / len(channels))
    overhead = {v: max(0.0, median(r)) for v, r in residuals.items()}
    kappa, overhead["sample-shuffle"] = least_squares(shuffled)
    overhead["sample-shuffle"] = max(0.0, overhead["sample-shuffle"])
    # SyncBN is not measured here: a layer that makes one small collective per forward from
    # Python costs about what the mpi transport's layer costs.
    overhead.setdefault("syncbn", overhead.get("shuffle-mpi", 0.0))
    # borrow_from="others", where not measured: its transport's per-layer overhead.
    for transport in ("mpi", "horovod"):
        overhead.setdefault(f"others-{transport}", overhead.get(f"shuffle-{transport}", 0.0))
    return {"links": links, "overhead": overhead, "kappa": kappa, "ranks": p, "batch": batch,
            "channels": channels}


def least_squares(points, slope_if_flat=1.0):
    """(slope, intercept) of y = slope x + intercept; with a single distinct x (a smoke run's one
    point) the slope cannot be fitted and is ``slope_if_flat``."""
    mx = sum(x for x, _ in points) / len(points)
    my = sum(y for _, y in points) / len(points)
    spread = sum((x - mx) ** 2 for x, _ in points)
    slope = sum((x - mx) * (y - my) for x, y in points) / spread if spread > 0 else slope_if_flat
    return slope, my - slope * mx


def predict(model, variant, p, batch, image, channels, alpha, beta):
    per = 1 if variant == "sample-shuffle" else len(channels)
    return (network_seconds(variant, p, batch, image, channels, alpha, beta, model["kappa"])
            + per * model["overhead"].get(variant, 0.0))


def predict_step(model, variant, p, channels, alpha, beta):
    """BN exchanges of one training step: forward + backward, each with the per-layer overhead."""
    return (network_seconds(variant, p, 0, 0, channels, alpha, beta)
            + backward_network_seconds(variant, p, channels, alpha, beta)
            + 2 * len(channels) * model["overhead"].get(variant, 0.0))


def latencies(model):
    """The per-message latencies predictions are made at: the one fitted here (4 ranks share 2
    cores, so it is mostly scheduling) and a datacenter NIC's."""
    return {"fitted here": median([a for a, _ in model["links"].values()]),
            "datacenter": DATACENTER_LATENCY}


def _grid(model, variants, bytes_of, seconds_of):
    """One row per latency, rate, rank count and variant: bytes_of(variant, p) and
    seconds_of(variant, p, alpha, beta)."""
    rows = []
    for latency, alpha in latencies(model).items():
        for rate in PREDICT_RATES:
            beta = 8 / (rate * 1e9)
            for p in PREDICT_RANKS:
                for variant in variants:
                    rows.append({"latency": latency, "alpha": alpha, "rate_gbit": rate,
                                 "ranks": p, "variant": variant, "bytes": bytes_of(variant, p),
                                 "seconds": seconds_of(variant, p, alpha, beta)})
    return rows


def predictions(model):
    """ResNet-50 at 224 px, 32 images per rank: bytes and seconds per key forward."""
    channels = resnet50_bn_channels()
    batch, image = RESNET50["batch"], RESNET50["image"]
    return _grid(model, VARIANTS,
                 lambda v, p: bytes_received(v, p, batch, image, channels),
                 lambda v, p, alpha, beta: predict(model, v, p, batch, image, channels, alpha,
                                                   beta))


def step_predictions(model):
    """ResNet-50: bytes and seconds of the BN layers' exchanges per training step."""
    channels = resnet50_bn_channels()
    return _grid(model, STEP_VARIANTS, lambda v, p: step_bytes_received(v, p, channels),
                 lambda v, p, alpha, beta: predict_step(model, v, p, channels, alpha, beta))


def section(network):
    """Markdown for RESULTS.md: measured points, the fit, the predictions."""
    model = fit(network)
    rows = predictions(model)
    first = network["settings"][0]
    out = ["## Over a shaped network: sample shuffling vs ShuffleBatchNorm\n",
           f"`make bench-network` (benchmarks/network.py): {network['hosts']} virtual hosts x "
           f"{network['slots']} ranks (network namespaces joined by a bridge; shared memory "
           "inside a host, TCP between them), each host's egress limited by `tc ... tbf`. "
           f"Key-encoder forward (no grad, train mode) of a ResNet-18 layout at 1/8 width "
           f"({len(first['bn_channels'])} BN layers, so the per-layer exchanges of ResNet-18, at "
           f"1/64 of its compute so that CPU time does not drown the communication), "
           f"{first['batch']} images per rank. Communication = the variant's forward - plain "
           "BN's, paired per round (median). Took "
           f"{network['seconds']:.0f} s; load average {' '.join(network['loadavg_start'])} at "
           "the start.\n"]
    seen = [v for v in VARIANTS if v != "sample-shuffle"
            and any(v in times for s in network["settings"] for times in s["keyfwd"].values())]
    header = (["link", "fitted latency", "fitted bandwidth", "image", "bn (compute)",
               "sample-shuffle comm"] + [f"{v} comm" for v in seen]
              + ["sample-shuffle / shuffle-mpi"])
    measured_rows = []
    for s in network["settings"]:
        a, b = model["links"][s["rate_gbit"]]
        for image, times in sorted(s["keyfwd"].items(), key=lambda kv: int(kv[0])):
            comm = {v: median([x - y for x, y in zip(times[v], times["bn"])])
                    for v in times if v != "bn"}
            ratio = comm["sample-shuffle"] / comm["shuffle-mpi"] if comm["shuffle-mpi"] > 0 else math.nan
            measured_rows.append([
                f"{s['rate_gbit']} Gbit/s" if s["rate_gbit"] else "unshaped veth", t(a),
                f"{8 / b / 1e9:.2f} Gbit/s" if b > 0 else "-", f"{image} px",
                t(median(times["bn"])), t(comm["sample-shuffle"])]
                + [t(comm[v]) if v in comm else "-" for v in seen] + [f"{ratio:.2f}"])
    out.append(table(header, measured_rows))
    o = model["overhead"]
    fitted = latencies(model)["fitted here"]
    out.append("**Cost model** (benchmarks/cost_model.py; formulas in its docstring). Fitted "
               "software overheads: ShuffleBatchNorm " + t(o.get("shuffle-mpi", 0)) +
               " per layer (mpi transport), " + t(o.get("shuffle-horovod", 0)) +
               " per layer (horovod transport; beyond its 1 ms cycle), " +
               "".join(f"`{v}` (`borrow_from=\"others\"`) " + (
                   f"{t(o.get(v, 0))} per layer, " if v in seen else
                   f"not measured here, given shuffle-{v[len('others-'):]}'s, ")
                   for v in ("others-mpi", "others-horovod")) + "sample shuffling " +
               t(o.get("sample-shuffle", 0)) + " per forward (copies, indexing), and its "
               f"allgathers put {model['kappa']:.2f}x the ideal ring's bytes through the slowest "
               "link (Open MPI's algorithm for 4 ranks on 2 hosts, and 2 ranks' streams sharing "
               "a host's shaped link); SyncBN, not "
               "measured here, is given the mpi transport's per-layer overhead. The fitted "
               f"latency per message is {t(fitted)}: 4 ranks and their Horovod threads share "
               "2 cores, so a message waits for its receiver to be scheduled. Predictions assume "
               "one rank per NIC (a flat network) and the nominal bandwidth, at that latency and "
               f"at a datacenter NIC's {t(DATACENTER_LATENCY)}; the software overheads stay "
               "this machine's (pessimistic where each rank has its own core).\n")
    out.append("Predicted per key-encoder forward, ResNet-50 (53 BN layers), 224 px, 32 images per "
               "rank (bytes received per rank / communication time):\n\n"
               + _prediction_table(model, rows, VARIANTS))
    out.append("Predicted per training step, ResNet-50, the BN layers' exchanges only (forward + "
               "backward; the gradient allreduce, the same for all, left out): bytes received "
               "per rank / communication time. In the backward SyncBN sums 2C float32 and "
               "`others-*` sums 2C float64 over all ranks (ceil(log2 p) messages), where "
               "`shuffle-*` sends one row of 2C float64 to one rank (one message); each exchange "
               "costs the fitted per-layer overhead again.\n\n"
               + _prediction_table(model, step_predictions(model), STEP_VARIANTS))
    out.append(wire_table())
    return "\n".join(out), model, rows


def wire_only(p, channels, alpha, beta):
    """{variant: (key forward, training step)} seconds on the wire per ResNet-50 step, without
    any software overhead."""
    return {v: (network_seconds(v, p, 0, 0, channels, alpha, beta),
                network_seconds(v, p, 0, 0, channels, alpha, beta)
                + backward_network_seconds(v, p, channels, alpha, beta)) for v in STEP_VARIANTS}


def _prediction_table(model, rows, variants):
    """One line per latency, rate and rank count; a "bytes / time" cell per variant."""
    by_key = {(r["latency"], r["rate_gbit"], r["ranks"], r["variant"]): r for r in rows}
    lines = []
    for latency, alpha in latencies(model).items():
        for rate in PREDICT_RATES:
            for p in PREDICT_RANKS:
                cells = [f"{latency} ({t(alpha)})", f"{rate} Gbit/s", str(p)]
                for v in variants:
                    r = by_key[(latency, rate, p, v)]
                    cells.append(f"{size(r['bytes'])} / {t(r['seconds'])}")
                lines.append(cells)
    return table(["latency", "link", "ranks"] + [f"{v}: bytes / time" for v in variants], lines)


def wire_table(rate=25):
    """Markdown: the exchanges' time on the wire alone, where the variants differ by their
    messages rather than by this machine's software overheads."""
    channels, beta = resnet50_bn_channels(), 8 / (rate * 1e9)
    rows = []
    for p in PREDICT_RANKS:
        wire = wire_only(p, channels, DATACENTER_LATENCY, beta)
        rows.append([str(p)] + [f"{t(wire[v][0])} / {t(wire[v][1])}" for v in STEP_VARIANTS])
    return (f"The same model on the wire alone (no software overhead; {t(DATACENTER_LATENCY)} "
            f"per message, {rate} Gbit/s), ResNet-50's {len(channels)} BN layers: key-encoder "
            "forward / training step (BN exchanges only). The horovod variants include 1 ms of "
            "negotiation cycle per exchange.\n\n"
            + table(["ranks"] + [f"{v}: keyfwd / step" for v in STEP_VARIANTS], rows))


def plot(network, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    model = fit(network)
    rows = predictions(model)
    p, batch, channels = model["ranks"], model["batch"], model["channels"]
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(13, 4.8))
    colours = {"sample-shuffle": "tab:red", "shuffle-mpi": "tab:blue", "shuffle-horovod": "tab:green",
               "syncbn": "tab:purple", "others-mpi": "tab:cyan", "others-horovod": "tab:olive"}
    images = sorted({int(i) for s in network["settings"] for i in s["keyfwd"]})
    fine = list(range(min(images), max(images) + 1, 4))
    for s in network["settings"]:
        if s["rate_gbit"] is None:
            continue
        a, b = model["links"][s["rate_gbit"]]
        for v in ("sample-shuffle", "shuffle-mpi", "others-mpi"):
            if not all(v in s["keyfwd"][str(i)] for i in images if str(i) in s["keyfwd"]):
                continue
            points = [(i, median([x - y for x, y in zip(s["keyfwd"][str(i)][v], s["keyfwd"][str(i)]["bn"])]))
                      for i in images if str(i) in s["keyfwd"]]
            ax.scatter([i for i, _ in points], [c * 1e3 for _, c in points], color=colours[v],
                       marker={1: "o", 10: "s", 25: "^"}.get(s["rate_gbit"], "x"))
            ax.plot(fine, [predict(model, v, p, batch, i, channels, a, b) * 1e3 for i in fine],
                    color=colours[v], lw=1, ls={1: "-", 10: "--", 25: ":"}.get(s["rate_gbit"], "-."),
                    label=f"{v}, {s['rate_gbit']} Gbit/s")
    ax.set_yscale("log")
    ax.set_xlabel("image size (px)")
    ax.set_ylabel("communication per key forward (ms)")
    ax.set_title(f"{p} ranks on 2 hosts: measured (markers: ● 1, ■ 10, ▲ 25 Gbit/s), "
                 "model (lines)", fontsize=10)
    ax.legend(fontsize=7, ncol=2)
    for v in VARIANTS:
        for latency, ls in (("datacenter", "-"), ("fitted here", ":")):
            pts = sorted((r["ranks"], r["seconds"]) for r in rows if r["variant"] == v
                         and r["rate_gbit"] == 25 and r["latency"] == latency)
            bx.plot([q for q, _ in pts], [t * 1e3 for _, t in pts], color=colours[v], ls=ls,
                    marker="o", label=f"{v}, {latency} latency")
    bx.set_xscale("log", base=2)
    bx.set_yscale("log")
    bx.set_xlabel("ranks")
    bx.set_ylabel("predicted communication per key forward (ms)")
    bx.set_title("Model: ResNet-50, 224 px, 32 images per rank, 25 Gbit/s")
    bx.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main():
    import argparse
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("network", nargs="?", default=str(HERE / "results" / "network.json"))
    p.add_argument("--png", default=None)
    args = p.parse_args()
    network = json.loads(Path(args.network).read_text())
    text, model, rows = section(network)
    print(text)
    if args.png:
        plot(network, args.png)


if __name__ == "__main__":
    main()

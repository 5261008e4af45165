"""Launch every benchmark run (each rank count and Horovod setting is its own mpirun, since Horovod
reads its settings at hvd.init()), collect the JSON results and write RESULTS.md and results.png.

    .venv/bin/python benchmarks/run_all.py            # full: about 24 minutes on 2 cores
    .venv/bin/python benchmarks/run_all.py --only network   # the shaped network alone
    .venv/bin/python benchmarks/run_all.py --smoke    # CI: seconds, into a temporary directory
    .venv/bin/python benchmarks/run_all.py --only sweep-cycle-5   # re-run some launches, by label

host-cost-1 and host-cost-2 run host_cost.py (per call host time and aten ops); the rest bench.py.
"""
import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PYTHON = Path(sys.executable)

# Horovod's defaults in 0.28.1 (horovod/common/operations.cc, global_state.h): cycle time 1 ms,
# fusion threshold 128 MiB, response cache capacity 1024. The sweep changes one at a time.
SWEEP = [
    ("default", {}),
    ("cycle-0.1", {"HOROVOD_CYCLE_TIME": "0.1"}),
    ("cycle-5", {"HOROVOD_CYCLE_TIME": "5"}),
    ("cycle-10", {"HOROVOD_CYCLE_TIME": "10"}),
    ("fusion-0", {"HOROVOD_FUSION_THRESHOLD": "0"}),
    ("fusion-4M", {"HOROVOD_FUSION_THRESHOLD": str(4 << 20)}),
    ("cache-0", {"HOROVOD_CACHE_CAPACITY": "0"}),
    ("yield-when-idle", {"OMPI_MCA_mpi_yield_when_idle": "1"}),  # Open MPI, not Horovod
]
# The settings act on the transports, whichever the mode: the sweep times the default mode
# (shuffle-*) only; others-* runs in the main launches.
SWEEP_ARGS = ["--parts", "micro,macro", "--models", "resnet18", "--micro-rounds", "15",
              "--variants", "bn,shuffle-horovod,shuffle-mpi", "--steps", "8"]

# (label, ranks, bench.py arguments, environment, timeout in seconds)
MICRO, MACRO, BYTES = ["--parts", "micro"], ["--parts", "macro"], ["--parts", "bytes"]
RUNS = ([("host-cost-1", 1, [], {}, 300), ("host-cost-2", 2, [], {}, 300),
         ("micro-2", 2, MICRO, {}, 300),
         ("control-no-horovod-2", 2, ["--no-horovod"], {}, 300),
         # The step goals are read here: twice the steps, as a 2-core machine is noisy.
         ("macro-2", 2, MACRO + ["--steps", "24"], {}, 900),
         ("bytes-2", 2, BYTES, {}, 300)]
        + [(f"sweep-{label}", 2, SWEEP_ARGS, env, 600) for label, env in SWEEP]
        + [("micro-4", 4, MICRO, {}, 300),
           ("macro-4", 4, MACRO, {}, 1500),
           ("bytes-4", 4, BYTES, {}, 300),
           ("bytes-8", 8, BYTES + ["--models", "resnet18"], {}, 600)]
        # The sweep again in reverse order: load drifts between launches, a second pass in the
        # other order shows whether a setting's ratio is its own or the machine's at that time.
        + [(f"sweep-{label}-r2", 2, SWEEP_ARGS, env, 600) for label, env in reversed(SWEEP)])
# host_cost.py at one rank only: its several-rank path is bench.py's launch with the same
# transports, and every launch costs the tests seconds of start-up.
SMOKE_RUNS = [("smoke-2", 2, ["--smoke"], {}, 150), ("host-cost-1", 1, ["--smoke"], {}, 90)]
# The shaped two-host network (network.py): not an mpirun of bench.py, a driver of its own.
NETWORK = "network"


def mpirun(ranks, args, env, out):
    command = ["mpirun", "-np", str(ranks), "--oversubscribe", "--allow-run-as-root"]
    for key, value in env.items():
        command += ["-x", f"{key}={value}"]
    script = "host_cost.py" if out.stem.startswith("host-cost-") else "bench.py"
    return command + [str(PYTHON), str(HERE / script), *args, "--out", str(out)]


def run(command, env, timeout):
    """Exit code of ``command``, or "timeout"; on timeout its whole process group (mpirun and the
    ranks it forked) is terminated, so no rank is left spinning."""
    proc = subprocess.Popen(command, cwd=ROOT, env=env, start_new_session=True)
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(proc.pid, sig)
                proc.wait(timeout=10)
                break
            except subprocess.TimeoutExpired:
                continue
            except ProcessLookupError:
                break
        return "timeout"


def network(results, smoke, env, manifest):
    """Run network.py (one point with --smoke); skipped, with the reason, where the two-host
    harness cannot run (not root, no network namespaces), as the multi-host tests are."""
    sys.path.insert(0, str(ROOT / "tests"))
    import multihost
    reason = multihost.unusable_reason()
    if reason:
        print(f"[{NETWORK}] skipped: {reason}", flush=True)
        return []
    command = [str(PYTHON), str(HERE / "network.py"), "--out", str(results / "network.json")]
    command += ["--smoke"] if smoke else []
    print(f"[{NETWORK}] {' '.join(c.replace(str(ROOT) + '/', '') for c in command)}", flush=True)
    start = time.time()
    code = run(command, env, 300 if smoke else 1800)
    manifest[NETWORK] = {"command": " ".join(command), "settings": {}, "exit": code,
                         "seconds": round(time.time() - start, 1)}
    print(f"[{NETWORK}] exit {code} after {time.time() - start:.0f} s", flush=True)
    return [] if code == 0 else [NETWORK]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--only", default=None, help="comma-separated labels to (re-)run")
    p.add_argument("--results", default=None, help="directory for JSON (default benchmarks/results)")
    args = p.parse_args()
    runs = SMOKE_RUNS if args.smoke else RUNS
    if args.only:
        runs = [r for r in runs if r[0] in args.only.split(",")]
    results = Path(args.results or (tempfile.mkdtemp(prefix="bench-smoke-") if args.smoke
                                    else HERE / "results"))
    results.mkdir(parents=True, exist_ok=True)
    manifest_path = results / "runs.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
               PYTHONUNBUFFERED="1")
    env["PATH"] = f"{PYTHON.parent}{os.pathsep}{env.get('PATH', '')}"
    failed = []
    for label, ranks, bench_args, settings, timeout in runs:
        out = results / f"{label}.json"
        command = mpirun(ranks, bench_args, settings, out)
        shown = " ".join(str(c).replace(str(ROOT) + "/", "") for c in command)
        print(f"[{label}] {shown}", flush=True)
        start = time.time()
        code = run(command, env, timeout)
        seconds = time.time() - start
        print(f"[{label}] exit {code} after {seconds:.0f} s", flush=True)
        manifest[label] = {"command": shown, "settings": settings, "exit": code,
                           "seconds": round(seconds, 1)}
        if code != 0:
            failed.append(label)
    if not args.only or NETWORK in args.only.split(","):
        failed += network(results, args.smoke, env, manifest)
    manifest_path.write_text(json.dumps(manifest, indent=1))
    report = [str(PYTHON), str(HERE / "report.py"), "--results", str(results)]
    if args.smoke:
        report += ["--out", str(results)]
    failed += [] if subprocess.run(report, cwd=ROOT).returncode == 0 else ["report"]
    if args.smoke and not args.results:
        shutil.rmtree(results, ignore_errors=True)
    if failed:
        sys.exit(f"failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()

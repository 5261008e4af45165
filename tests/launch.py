"""Start a script on several ranks with mpirun, horovodrun or torchrun, with a timeout, for the
tests."""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
TIMEOUT = 300  # seconds; a hang fails the test instead of the whole run


def launch_env(**extra):
    env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
               OMPI_MCA_rmaps_base_oversubscribe="1", PYTHONUNBUFFERED="1", **extra)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    return env


def command(launcher, ranks, script, *args):
    python = [sys.executable, str(script), *args]
    if launcher == "mpirun":
        return ["mpirun", "-np", str(ranks), "--oversubscribe", "--allow-run-as-root", *python]
    if launcher in ("horovodrun-gloo", "horovodrun-mpi"):
        return [str(BIN / "horovodrun"), "-np", str(ranks), f"--{launcher.split('-')[1]}",
                *python]
    if launcher == "torchrun":
        return [str(BIN / "torchrun"), "--standalone", f"--nproc-per-node={ranks}", str(script),
                *args]
    raise ValueError(launcher)


def run(launcher, ranks, script, *args, timeout=TIMEOUT, **env):
    """Run and return the CompletedProcess; the output is printed so pytest shows it on failure."""
    try:
        done = subprocess.run(command(launcher, ranks, script, *args), cwd=ROOT,
                              env=launch_env(**env), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as expired:
        out = expired.stdout.decode() if isinstance(expired.stdout, bytes) else expired.stdout
        print(out or "")
        raise AssertionError(f"{launcher} -np {ranks} {script} hung for {timeout} s") from None
    print(done.stdout)
    return done

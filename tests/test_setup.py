"""scripts/setup.sh's choice of Horovod variant (CPU or NCCL), through its dry run: no build.

Each test runs a copy of the script in a repository of its own under tmp_path, with a PATH that
holds only the few tools the dry run needs plus, where a test wants one, a fake nvcc; a fake
NCCL (include/nccl.h, lib/libnccl.so); and a fake .venv/bin/python that answers the script's
torch query the way a CPU-only or a CUDA torch would. Nothing of this machine's CUDA, NCCL,
venv or wheel cache is seen.
"""
import os
import shutil
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "setup.sh"
# What the dry run runs besides bash's builtins (nvcc left out on purpose).
TOOLS = ("bash", "sh", "cat", "dirname", "readlink", "sed", "head", "env", "grep", "sort", "ls")
CUDA_TORCH = "2.13.0_cu124 12.4 cp311"   # find_torch's line: version, CUDA, Python tag, NCCL dir
CPU_TORCH = "2.13.0_cpu none cp311"
CPU_CACHE = "horovod-0.28.1-torch2.13.0_cpu-cp311"          # the name caches had before variants
NCCL_CACHE = "horovod-0.28.1-torch2.13.0_cu124-cp311-nccl"


def executable(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(0o755)
    return path


def fake_nvcc(bindir):
    return executable(bindir / "nvcc", "#!/bin/sh\n"
                      "echo 'Cuda compilation tools, release 12.4, V12.4.131'\n")


def fake_nccl(home, lib="lib", libname="libnccl.so"):
    (home / "include").mkdir(parents=True, exist_ok=True)
    (home / "include" / "nccl.h").write_text("#define NCCL_MAJOR 2\n")
    (home / lib).mkdir(parents=True, exist_ok=True)
    (home / lib / libname).write_text("")
    return home


@pytest.fixture
def setup(tmp_path):
    """Returns run(env=None, nvcc=False, torch=None, args=()) -> CompletedProcess."""
    repo = tmp_path / "repo"
    (repo / "scripts").mkdir(parents=True)
    shutil.copy(SCRIPT, repo / "scripts" / "setup.sh")
    tools = tmp_path / "tools"
    tools.mkdir()
    for tool in TOOLS:
        found = shutil.which(tool)
        assert found, tool
        (tools / tool).symlink_to(found)
    bindir = tmp_path / "bin"
    bindir.mkdir()

    def run(env=None, nvcc=False, torch=None, args=()):
        if nvcc:
            fake_nvcc(bindir)
        if torch is not None:
            executable(repo / ".venv" / "bin" / "python",
                       f"#!/bin/sh\ncat >/dev/null\necho '{torch}'\n")
        base = {k: v for k, v in os.environ.items()
                if not k.startswith(("HOROVOD_", "CUDA_", "HVD_SHUFFLEBN_"))}
        base.update(PATH=f"{bindir}:{tools}", HOME=str(tmp_path / "home"),
                    HVD_SHUFFLEBN_CACHE=str(tmp_path / "cache"), HVD_SHUFFLEBN_DRY_RUN="1")
        base.update(env or {})
        return subprocess.run([str(tools / "bash"), str(repo / "scripts" / "setup.sh"), *args],
                              env=base, capture_output=True, text=True, timeout=60)

    run.tmp = tmp_path
    run.repo = repo
    return run


def variant(result):
    lines = [l for l in result.stdout.splitlines() if l.startswith("[setup] Horovod variant: ")]
    assert len(lines) == 1, result.stdout + result.stderr
    return lines[0].split()[3]


def ok(result):
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def test_nvcc_and_nccl_home_choose_nccl(setup):
    nccl = fake_nccl(setup.tmp / "nccl")
    result = ok(setup(env={"HOROVOD_NCCL_HOME": str(nccl)}, nvcc=True, torch=CUDA_TORCH))
    out = result.stdout
    assert variant(result) == "nccl"
    assert "[setup]   HOROVOD_GPU_OPERATIONS=NCCL\n" in out
    assert f"[setup]   HOROVOD_NCCL_INCLUDE={nccl}/include\n" in out
    assert f"[setup]   HOROVOD_NCCL_LIB={nccl}/lib\n" in out
    assert f"[setup]   HOROVOD_NCCL_HOME={nccl} (from the environment)\n" in out
    assert "nvcc 12.4" in out and "torch 2.13.0+cu124 with CUDA 12.4" in out
    assert f"wheel cache: {setup.tmp}/cache/{NCCL_CACHE} (empty: would build" in out


def test_nccl_in_cuda_home_chooses_nccl(setup):
    # nvcc in $CUDA_HOME/bin (not on PATH) and NCCL installed into the toolkit, under lib64.
    cuda = fake_nccl(setup.tmp / "cuda", lib="lib64")
    fake_nvcc(cuda / "bin")
    result = ok(setup(env={"CUDA_HOME": str(cuda)}, torch=CUDA_TORCH))
    out = result.stdout
    assert variant(result) == "nccl"
    assert f"[setup]   HOROVOD_CUDA_HOME={cuda}\n" in out
    assert f"[setup]   HOROVOD_NCCL_LIB={cuda}/lib64\n" in out


def test_nccl_of_torchs_pip_package_chooses_nccl(setup):
    # A CUDA torch from pip brings nvidia-nccl (libnccl.so.2 only, linked through a link of ours).
    pip_nccl = fake_nccl(setup.tmp / "site-packages" / "nvidia" / "nccl", libname="libnccl.so.2")
    result = ok(setup(nvcc=True, torch=f"{CUDA_TORCH} {pip_nccl}"))
    out = result.stdout
    assert variant(result) == "nccl"
    assert f"[setup]   HOROVOD_NCCL_INCLUDE={pip_nccl}/include\n" in out


def test_no_nvcc_chooses_cpu(setup):
    nccl = fake_nccl(setup.tmp / "nccl")
    result = ok(setup(env={"HOROVOD_NCCL_HOME": str(nccl)}, torch=CUDA_TORCH))
    out = result.stdout
    assert variant(result) == "cpu"
    assert "no nvcc on PATH" in out
    assert "[setup]   HOROVOD_GPU_OPERATIONS=\n" in out
    assert "HOROVOD_GPU_OPERATIONS=NCCL" not in out and "HOROVOD_NCCL_INCLUDE" not in out
    assert f"wheel cache: {setup.tmp}/cache/horovod-0.28.1-torch2.13.0_cu124-cp311 (" in out


def test_nvcc_without_linkable_nccl_chooses_cpu(setup):
    # The runtime library alone (libnccl.so.2, no libnccl.so or libnccl_static.a) cannot be linked.
    nccl = fake_nccl(setup.tmp / "nccl", libname="libnccl.so.2")
    result = ok(setup(env={"HOROVOD_NCCL_HOME": str(nccl)}, nvcc=True, torch=CUDA_TORCH))
    out = result.stdout
    assert variant(result) == "cpu"
    assert f"no NCCL (nccl.h with libnccl.so or libnccl_static.a) in HOROVOD_NCCL_HOME={nccl}" in out


def test_cpu_only_torch_chooses_cpu_and_keeps_the_cpu_cache_name(setup):
    # The CPU wheel cache keeps the name it had before variants: an existing wheel is used.
    wheel_dir = setup.tmp / "cache" / CPU_CACHE
    wheel_dir.mkdir(parents=True)
    (wheel_dir / "horovod-0.28.1-cp311-cp311-linux_x86_64.whl").write_text("")
    nccl = fake_nccl(setup.tmp / "nccl")
    result = ok(setup(env={"HOROVOD_NCCL_HOME": str(nccl)}, nvcc=True, torch=CPU_TORCH))
    out = result.stdout
    assert variant(result) == "cpu"
    assert "torch 2.13.0+cpu is CPU-only" in out
    assert "[setup]   HOROVOD_GPU_OPERATIONS=\n" in out
    assert f"wheel cache: {wheel_dir} (has the wheel: no build)" in out


def test_explicit_empty_forces_cpu(setup):
    nccl = fake_nccl(setup.tmp / "nccl")
    env = {"HOROVOD_NCCL_HOME": str(nccl), "HOROVOD_GPU_OPERATIONS": ""}
    result = ok(setup(env=env, nvcc=True, torch=CUDA_TORCH))
    out = result.stdout
    assert variant(result) == "cpu"
    assert "(HOROVOD_GPU_OPERATIONS is set empty)" in out
    assert "[setup]   HOROVOD_GPU_OPERATIONS=\n" in out
    assert "-nccl" not in out


def test_explicit_nccl_forces_nccl(setup):
    # Neither nvcc nor NCCL found, torch not installed yet: NCCL all the same, with warnings.
    result = ok(setup(env={"HOROVOD_GPU_OPERATIONS": "NCCL", "HOROVOD_NCCL_HOME": str(setup.tmp)}))
    assert variant(result) == "nccl"
    assert "[setup]   HOROVOD_GPU_OPERATIONS=NCCL\n" in result.stdout
    assert "warning: no nvcc found" in result.stderr
    assert "warning: no NCCL found" in result.stderr
    assert "torch's CUDA unknown" in result.stdout
    assert "-nccl (torch's version once installed)" in result.stdout


def test_explicit_nccl_with_cpu_only_torch_fails_early(setup):
    nccl = fake_nccl(setup.tmp / "nccl")
    result = setup(env={"HOROVOD_GPU_OPERATIONS": "NCCL", "HOROVOD_NCCL_HOME": str(nccl)},
                   nvcc=True, torch=CPU_TORCH)
    assert result.returncode == 1
    assert "needs a CUDA build of torch, but torch 2.13.0+cpu is CPU-only" in result.stderr
    assert variant(result) == "nccl"


def test_explicit_other_value_is_refused(setup):
    result = setup(env={"HOROVOD_GPU_OPERATIONS": "MPI"}, nvcc=True, torch=CUDA_TORCH)
    assert result.returncode == 1
    assert "HOROVOD_GPU_OPERATIONS=MPI" in result.stderr


def test_no_venv_decides_from_nvcc_and_nccl(setup):
    nccl = fake_nccl(setup.tmp / "nccl")
    result = ok(setup(env={"HOROVOD_NCCL_HOME": str(nccl)}, nvcc=True))
    out = result.stdout
    assert variant(result) == "nccl"
    assert "torch's CUDA unknown" in out
    assert "horovod-0.28.1-torch<version>-<cpXY>-nccl (torch's version once installed)" in out


def test_dry_run_flag_changes_nothing(setup):
    result = ok(setup(env={"HVD_SHUFFLEBN_DRY_RUN": "0"}, args=("--dry-run",)))
    assert variant(result) == "cpu"
    assert "dry run: nothing is installed or built" in result.stdout
    assert not (setup.repo / ".venv").exists()
    assert not (setup.tmp / "cache").exists()
    bad = setup(args=("--bogus",))
    assert bad.returncode == 2 and "usage" in bad.stderr

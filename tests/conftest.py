"""Shared fixtures: tiny generated data in the competition layout. Under pytest-xdist (the suite's default,
pyproject.toml) each worker gets its share of the cores' threads, and so do the processes its tests start."""
import gc
import getpass
import multiprocessing
import os
import runpy
import sys
import tempfile
import time
from pathlib import Path

import pytest

# torch.compile's kernel cache stays where it is without the tests' TMPDIR (child_temp_dir below), so that
# the compile test reuses the kernels of earlier runs on this machine instead of compiling them anew each time
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR",
                      os.path.join(tempfile.gettempdir(), f"torchinductor_{getpass.getuser()}"))

if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    _threads = max(1, len(os.sched_getaffinity(0)) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(_threads)
    import torch
    torch.set_num_threads(_threads)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED = ROOT.parent / "shared"


def pytest_collection_finish(session):
    """Every module the tests import is imported now: their half a million objects (torch, timm, sympy, pandas)
    are moved out of the garbage collector's sight. Each full collection spent 0.4 s walking them, 10-11 s of
    each worker's run in all (pytest adds five at its end); this saves about 2 s of that per worker, as modules
    imported later and the tests' own objects remain."""
    gc.freeze()


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """24 train people and 6 eval people with 128x96 images (cached for the whole session)."""
    from sample import make_sample  # here, not above: xdist's controller process has no use for torch
    return make_sample(tmp_path_factory.mktemp("tiny"), n_people=24, n_eval_people=6, size=(128, 96), seed=1)


@pytest.fixture(scope="session")
def shared_weights():
    path = SHARED / "weights" / "efficientnet_lite0.safetensors"
    if not path.is_file():
        pytest.skip(f"shared weights not found: {path}")
    return path


@pytest.fixture(scope="session", autouse=True)
def child_temp_dir(tmp_path_factory):
    """The processes the tests start (and kill) keep their temporary files under pytest's folder:
    timm imports wandb, which makes two temporary folders per process that a killed one leaves."""
    previous = os.environ.get("TMPDIR")
    os.environ["TMPDIR"] = str(tmp_path_factory.mktemp("child_tmp"))
    yield
    if previous is None:
        os.environ.pop("TMPDIR", None)
    else:
        os.environ["TMPDIR"] = previous


# a fresh interpreter spends 4-6 s of this 2-core machine importing torch, timm and the project; the tests that
# need processes of their own (to kill them, or to run two at once) fork them from a server that imported it once
FORKSERVER = multiprocessing.get_context("forkserver")
FORKSERVER.set_forkserver_preload(["train", "search"])


def printing_to(stdout, stderr, target, *args):
    """target(*args) with what it prints written to the files `stdout` and `stderr` (the body of start_forked's
    processes: they inherit no descriptors from the test)."""
    sys.stdout, sys.stderr = open(stdout, "w", buffering=1), open(stderr, "w", buffering=1)  # closed at exit
    os.dup2(sys.stdout.fileno(), 1)
    os.dup2(sys.stderr.fileno(), 2)
    target(*args)


def run_script(path, *args):
    """The script at `path` run as `python path *args` runs it (a start_forked target)."""
    sys.argv = [str(path), *map(str, args)]
    runpy.run_path(str(path), run_name="__main__")


def start_forked(target, *args, stdout, stderr=os.devnull) -> multiprocessing.Process:
    """A started process that runs target(*args) as a script would: an uncaught SystemExit sets its exit code,
    and a message one is printed to `stderr`. `stdout` is a file to read with printed_lines."""
    Path(stdout).touch()
    process = FORKSERVER.Process(target=printing_to, args=(str(stdout), str(stderr), target, *args))
    process.start()
    return process


def printed_lines(stdout, process):
    """The lines a start_forked process prints to `stdout`, as it prints them, until it ends."""
    with open(stdout) as file:
        line = ""
        while True:
            alive = process.is_alive()
            line += file.readline()
            if line.endswith("\n"):
                yield line
                line = ""
            elif not alive:
                if line:
                    yield line
                return
            else:
                time.sleep(0.05)

"""Shared fixtures: tiny generated data in the competition layout. Under pytest-xdist (the suite's default,
pyproject.toml) each worker gets its share of the cores' threads, and so do the processes its tests start."""
import getpass
import os
import sys
import tempfile
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

from sample import make_sample  # noqa: E402


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """24 train people and 6 eval people with 128x96 images (cached for the whole session)."""
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

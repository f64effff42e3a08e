"""Shared fixtures: tiny generated data in the competition layout."""
import os
import sys
from pathlib import Path

import pytest

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

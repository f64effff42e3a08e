"""Shared pieces of the benchmarks: the generated input set and a faithful copy of the competition
baseline's way of loading (PIL decode, centre crop, resize, float ToTensor + Normalize per image on
the CPU, float default collate), the reference every ratio is taken against."""
import os
import platform
import subprocess
import sys
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import transforms as T

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sample import make_sample  # noqa: E402

MEAN, STD = (0.548, 0.504, 0.479), (0.237, 0.247, 0.246)  # the baseline's defaults


def bench_data_dir(n_people, work_dir) -> Path:
    """A generated set of 512x384 JPEGs in the competition layout (made once per size)."""
    out = Path(work_dir) / f"people{n_people}"
    if not (out / "train" / "train.csv").is_file():
        make_sample(out, n_people=n_people, n_eval_people=0, size=(512, 384), seed=0, quality=90)
    return out / "train"


class BaselineDataset(Dataset):
    """The baseline's MaskBaseDataset loading path: lists of paths and labels, `Image.open` per item,
    a torchvision transform to a normalised float tensor."""

    def __init__(self, paths, labels, transform):
        self.image_paths, self.labels, self.transform = list(paths), list(labels), transform

    def __len__(self):
        return len(self.image_paths)

    def __getitem__(self, index):
        image = Image.open(self.image_paths[index])
        return self.transform(image), self.labels[index]


def baseline_transform(resize):
    """The baseline's CustomAugmentation, reduced to crop, resize and flip."""
    return T.Compose([T.CenterCrop((320, 256)), T.Resize(resize, T.InterpolationMode.BILINEAR),
                      T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(MEAN, STD)])


def model_specs(specs) -> list:
    """["resnet18:128x96", "local-dir:FOLDER:160x160", ...] -> [("resnet18", [128, 96]), ...]."""
    parsed = []
    for spec in specs:
        name, size = spec.rsplit(":", 1)
        parsed.append((name, [int(v) for v in size.split("x")]))
    return parsed


def peak_rss_mb() -> float:
    """Peak resident memory of this process and its finished children, MiB."""
    import resource
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return (own + children) / 1024


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    from precision import cpu_flags  # here, not at the top: the loader benchmark's child processes need no timm
    return f"{cpu} ({cpu_flags()}), {os.cpu_count()} cores, torch {torch.__version__}, commit {commit() or '?'}"


def commit() -> str:
    """The project's git commit (short), for a result row: which code measured it ("" outside git)."""
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT,
                              timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def report(lines, out):
    """Print the table and write it to `out`."""
    text = "\n".join(lines)
    print(text)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(text + "\n")

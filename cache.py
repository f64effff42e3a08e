"""Every image decoded once before the work: the full check of a set of image files (remembered per
file by path, size and mtime, so that unchanged files are not decoded again), and the decoded-image
cache, whose build is that check too.

The cache: each image is decoded once, centre-cropped and resized (a transform's deterministic
`prepare` step) and stored as uint8 CHW in one flat file with a small JSON index. Reads use
`os.pread` of one fixed-size record, so a worker's memory stays flat whatever the file size. The file
name is a hash of the preprocessing settings and of every image's path, size and mtime: a change of
either builds a new cache instead of reading a stale one. Two processes building the same cache at
once take turns (a file lock): the second finds the first one's cache."""
import fcntl
import hashlib
import json
import os
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from dataset import ImageFiles
from runs import atomic_write, write_csv, write_json

CACHE_VERSION = 3  # 3: an image's crop region is its own (faces as data), not the transform's
DEFAULT_CACHE_DIR = "./.cache/masktrain"
CHECKED_FILE = "checked_images.json"


class BadImagesError(ValueError):
    """Images that do not decode; `bad` lists every one as (path, reason)."""

    def __init__(self, bad, listing=None):
        self.bad, self.listing = list(bad), listing
        shown = "; ".join(f"{path} ({reason})" for path, reason in self.bad[:10])
        where = f", all listed in {listing}" if listing else ""
        super().__init__(f"{len(self.bad)} unreadable image(s){where}: {shown}" + (" ..." if len(bad) > 10 else ""))


def write_bad_images(bad, path) -> Path:
    """The full list of unreadable images as a CSV (path, reason) at `path`; returns `path`."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    write_csv(path, pd.DataFrame(bad, columns=["path", "reason"]))
    return Path(path)


def file_stamp(path) -> str:
    stat = os.stat(path)
    return f"{stat.st_size}:{stat.st_mtime_ns}"


@contextmanager
def locked(lock_path):
    """An exclusive lock on `lock_path` (created if needed) for the `with` block."""
    with open(lock_path, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


class DecodeAll(ImageFiles):
    """ImageFiles that reports instead of raising. Item i: (image through `transform`, or None without
    one (a check only) or when unreadable; i; error text)."""

    def __getitem__(self, index):
        try:
            image, _ = super().__getitem__(index)
        except ValueError as error:
            return None, index, str(error).split(": ", 1)[-1]
        return (image if self.transform is not None else None), index, ""


def collate_decoded(batch):
    images = [item[0] for item in batch if item[0] is not None]
    return torch.stack(images) if images else None, [item[1] for item in batch], [item[2] for item in batch]


def decode_all(paths, transform=None, num_workers=0, batch_size=32, desc="checking", regions=None):
    """Decode every image of `paths` in parallel, with a progress bar; yields (readable images through
    `transform` (each with its crop region) stacked, or None; indices; error texts) per batch."""
    loader = DataLoader(DecodeAll(paths, transform, regions), batch_size, num_workers=num_workers,
                        collate_fn=collate_decoded)
    yield from tqdm(loader, desc=f"{desc} {len(paths)} images", leave=False, dynamic_ncols=True,
                    disable=len(paths) == 0)


def remember_good(cache_dir, paths):
    """Add `paths` (decoded without error) to the record of checked files in `cache_dir`."""
    record = Path(cache_dir) / CHECKED_FILE
    with locked(record.with_suffix(".lock")):
        checked = json.loads(record.read_text()) if record.is_file() else {}
        checked.update({os.path.abspath(p): file_stamp(p) for p in paths})
        write_json(record, checked)


def check_images(paths, cache_dir=DEFAULT_CACHE_DIR, num_workers=0) -> list:
    """Fully decode every image of `paths` not already known good (same path, size and mtime); return
    all unreadable ones as (path, reason). The record is kept by absolute path."""
    paths = [str(p) for p in paths]
    Path(cache_dir).mkdir(parents=True, exist_ok=True)
    record = Path(cache_dir) / CHECKED_FILE
    checked = json.loads(record.read_text()) if record.is_file() else {}
    todo = [p for p in paths if checked.get(os.path.abspath(p)) != file_stamp(p)]
    bad = []
    for _, indices, errors in decode_all(todo, num_workers=num_workers):
        bad += [(todo[i], error) for i, error in zip(indices, errors, strict=True) if error]
    if todo:
        failed = {path for path, _ in bad}
        remember_good(cache_dir, [p for p in todo if p not in failed])
    return bad


def cache_key(paths, transform, regions=None) -> str:
    """A hash of how `transform` prepares an image (its family, size and centre crop) and of each image:
    its file (absolute path, size, mtime) and its crop region. The same files named from another folder,
    or by a relative instead of an absolute path, share one cache."""
    settings = dict(version=CACHE_VERSION, transform=type(transform).__name__, resize=list(transform.resize),
                    crop_fraction=transform.crop_fraction)
    digest = hashlib.sha1(json.dumps(settings, sort_keys=True).encode())
    regions = regions if regions is not None else [None] * len(paths)
    for path, region in zip(paths, regions, strict=True):
        where = "" if region is None else ",".join(str(int(v)) for v in region)
        digest.update(f"{os.path.abspath(path)}\0{file_stamp(path)}\0{where}\n".encode())
    return digest.hexdigest()[:20]


class DecodedCache:
    """uint8 CHW images by row (the position of the path given to `build`)."""

    def __init__(self, data_path, shape, count):
        self.data_path, self.shape, self.count = str(data_path), tuple(shape), count
        self.record = int(np.prod(self.shape))
        self._fd, self._pid = None, None

    @classmethod
    def build(cls, paths, transform, cache_dir, num_workers=0, batch_size=64, regions=None) -> "DecodedCache":
        """Open the cache of `paths` (each cropped at its region, None: the centre) prepared by `transform`,
        building it first if needed. The build
        decodes every image, so it is their check too: it raises BadImagesError listing every
        unreadable one, and leaves no cache behind then."""
        paths = [str(p) for p in paths]
        cache_dir = Path(cache_dir)
        cache_dir.mkdir(parents=True, exist_ok=True)
        key = cache_key(paths, transform, regions)
        data_path, index_path = cache_dir / f"{key}.u8", cache_dir / f"{key}.json"
        shape = (3, *transform.resize)
        bad = []

        def write(tmp):
            with open(tmp, "wb") as file:
                for images, indices, errors in decode_all(paths, transform.prepare, num_workers, batch_size,
                                                          "caching", regions):
                    bad.extend((paths[i], error) for i, error in zip(indices, errors, strict=True) if error)
                    if not bad:
                        file.write(images.numpy().tobytes())
            if bad:
                raise BadImagesError(bad)

        with locked(cache_dir / f"{key}.lock"):
            if index_path.is_file() and data_path.is_file():
                return cls(data_path, shape, len(paths))
            try:
                atomic_write(data_path, write)
            except BadImagesError:
                failed = {path for path, _ in bad}
                remember_good(cache_dir, [p for p in paths if p not in failed])
                raise
            remember_good(cache_dir, paths)
            write_json(index_path, dict(paths=paths, shape=shape, settings=type(transform).__name__))
        return cls(data_path, shape, len(paths))

    def __len__(self):
        return self.count

    def __getitem__(self, row) -> torch.Tensor:
        if self._pid != os.getpid():  # one file handle per (worker) process
            self._fd, self._pid = os.open(self.data_path, os.O_RDONLY), os.getpid()
        data = os.pread(self._fd, self.record, int(row) * self.record)
        return torch.frombuffer(bytearray(data), dtype=torch.uint8).view(self.shape)

    def __getstate__(self):
        return {**self.__dict__, "_fd": None, "_pid": None}

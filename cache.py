"""The decoded-image cache: each image is decoded once, centre-cropped and resized (a transform's
deterministic `prepare` step) and stored as uint8 CHW in one flat file with a small JSON index.
Reads use `os.pread` of one fixed-size record, so a worker's memory stays flat whatever the file size.
The file name is a hash of the preprocessing settings and of every image's path, size and mtime:
a change of either builds a new cache instead of reading a stale one."""
import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from dataset import ImageFiles, fast_collate
from runs import atomic_write, write_json

CACHE_VERSION = 1


def cache_key(paths, transform) -> str:
    """A hash of the preprocessing settings and of the image files (path, size, mtime)."""
    settings = dict(version=CACHE_VERSION, transform=type(transform).__name__, resize=list(transform.resize),
                    crop_fraction=transform.crop_fraction)
    digest = hashlib.sha1(json.dumps(settings, sort_keys=True).encode())
    for path in paths:
        stat = os.stat(path)
        digest.update(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:20]


class DecodedCache:
    """uint8 CHW images by row (the position of the path given to `build`)."""

    def __init__(self, data_path, shape, count):
        self.data_path, self.shape, self.count = str(data_path), tuple(shape), count
        self.record = int(np.prod(self.shape))
        self._fd, self._pid = None, None

    @classmethod
    def build(cls, paths, transform, cache_dir, num_workers=0, batch_size=64) -> "DecodedCache":
        """Open the cache of `paths` prepared by `transform`, building it first if needed."""
        paths = [str(p) for p in paths]
        cache_dir = Path(cache_dir)
        cache_dir.mkdir(parents=True, exist_ok=True)
        key = cache_key(paths, transform)
        data_path, index_path = cache_dir / f"{key}.u8", cache_dir / f"{key}.json"
        shape = (3, *transform.resize)
        if index_path.is_file() and data_path.is_file():
            return cls(data_path, shape, len(paths))
        loader = DataLoader(ImageFiles(paths, transform.prepare), batch_size, num_workers=num_workers,
                            collate_fn=fast_collate)

        def write(tmp):
            with open(tmp, "wb") as file:
                for images, _ in tqdm(loader, desc=f"caching {len(paths)} images", leave=False, dynamic_ncols=True):
                    file.write(images.numpy().tobytes())

        atomic_write(data_path, write)
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

"""Frozen stages run once (`train.py --cache_features`). With `--freeze N` the backbone's first stages
never change, so their output for every training image and for its mirror image (the only random
augmentation this allows) is computed once, kept in a file under `--cache_dir`, and every epoch, and
every later run with the same weights and images (the members of an ensemble), trains the remaining
stages and the heads on it. On a CPU the frozen stages' forward pass is about half of a `--freeze 5`
training step of efficientnet_lite0 at 160x160.

The frozen stages' batch norms first re-estimate their statistics on the training faces (AdaBN: 2,048
images in a fixed order) and then stay fixed, in training as at inference: the run's checkpoint holds
them, so inference runs the whole model as usual; the cache folder keeps them for the next member.
Backbones: timm's EfficientNet family (a stem, then `blocks`), where the frozen part is a prefix of the
stem and the stages."""
import hashlib
import json
import random
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from cache import cache_key, locked
from dataset import PrefetchLoader, Subset, fast_collate
from model import probs18
from precision import autocast
from runs import atomic_write, write_json

FEATURES_VERSION = 2
ADAPT_IMAGES = 2048


def stage_chain(backbone) -> list:
    """The backbone's stem and stages in forward order, or None where it is not built that way."""
    if not all(hasattr(backbone, name) for name in ("conv_stem", "bn1", "blocks", "conv_head", "bn2")):
        return None
    return [backbone.conv_stem, backbone.bn1, *backbone.blocks]


def check_supported(model) -> str:
    """Why `model` cannot train on cached features (empty where it can)."""
    if set(model.backbones) != {"shared"}:
        return "--cache_features needs one backbone shared by the heads (--kind three_head or single_head)"
    chain = stage_chain(model.backbones["shared"])
    if chain is None:
        return (f"--cache_features supports timm's EfficientNet family (a stem, then blocks), not "
                f"{type(model.backbones['shared']).__name__}")
    if frozen_prefix(chain) == 0:
        return "--cache_features needs --freeze N to leave the backbone's stem frozen"
    return ""


def frozen_prefix(chain) -> int:
    """How many modules at the start of `chain` have no trainable parameter."""
    count = 0
    for module in chain:
        if any(p.requires_grad for p in module.parameters()):
            break
        count += 1
    return count


class FromFeatures(nn.Module):
    """The model after its frozen stages: `forward(features)` gives what `model(images)` gives for the
    images whose frozen-stage output `features` is. It shares the model's modules (the optimizer, the
    weight average and the checkpoints see the model itself)."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        chain = stage_chain(model.backbones["shared"])
        split = frozen_prefix(chain)
        self.frozen, self.rest = nn.Sequential(*chain[:split]), chain[split:]

    def forward(self, features):
        backbone = self.model.backbones["shared"]
        for module in self.rest:
            features = module(features)
        pooled = backbone.forward_head(backbone.bn2(backbone.conv_head(features)))
        return self.model.head_outputs(pooled)


def adapt_batch_norms(frozen: nn.Module, loader) -> None:
    """AdaBN: replace the batch norms' running statistics by their averages over `loader`'s batches."""
    norms = [m for m in frozen.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # a cumulative average over the batches
    frozen.train()
    with torch.no_grad():
        for images, _ in loader:
            frozen(images)
    for norm, momentum in zip(norms, momenta, strict=True):
        norm.momentum = momentum
    frozen.eval()


def with_mirror(frozen: nn.Module, images, mirror=True) -> torch.Tensor:
    """(N, views, C, H, W): the frozen stages' output for `images`, and with `mirror` for their mirror images."""
    return torch.stack([frozen(images)] + ([frozen(images.flip(3))] if mirror else []), 1)


def short_hash(parts) -> str:
    """A short hash of JSON-able parts (a cache file's name)."""
    return hashlib.sha1(json.dumps(parts).encode()).hexdigest()[:20]


def state_digest(module: nn.Module) -> str:
    """A hash of a module's weights and buffers (the frozen stages' identity for the features file)."""
    digest = hashlib.sha1()
    for name, tensor in module.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:20]


class FeatureSet(Dataset):
    """(frozen-stage features, target) of training image i: the image's or, with probability 0.5
    (`flip`), its mirror image's, read from the features file."""

    def __init__(self, data_path, shape, targets, flip=True):
        self.data, self.shape = np.memmap(data_path, dtype=np.float32, mode="r", shape=shape), shape
        self.targets_, self.flip = targets, flip

    def __len__(self):
        return len(self.targets_)

    def __getitem__(self, i):
        view = 1 if self.flip and random.random() < 0.5 else 0
        return torch.from_numpy(np.array(self.data[i, view])), self.targets_[i]


def build_feature_set(model, train_set: Subset, transform, mean, std, cache_dir, device, channels_last=False,
                      flip=True, batch_size=64) -> FeatureSet:
    """Adapt the frozen stages' batch norms to `train_set`'s images as `transform` (deterministic)
    prepares them, then open the file of their features (and their mirror images'), computing it
    first where no earlier run did."""
    train_set = Subset(train_set.dataset, train_set.indices, transform)
    layout = torch.channels_last if channels_last else torch.preserve_format
    frozen = FromFeatures(model).frozen.to(device, memory_format=layout)

    def batches(subset):
        loader = DataLoader(subset, batch_size, shuffle=False, collate_fn=fast_collate)
        for images, targets in PrefetchLoader(loader, mean, std, device):
            yield (images.contiguous(memory_format=torch.channels_last) if channels_last else images), targets

    paths = [train_set.dataset.paths[i] for i in train_set.indices]
    images_key = cache_key(paths, transform, [train_set.dataset.regions[i] for i in train_set.indices])
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    stats_key = short_hash([FEATURES_VERSION, ADAPT_IMAGES, images_key, state_digest(frozen), list(mean), list(std)])
    stats_path = cache_dir / f"{stats_key}.adabn.pt"
    with locked(stats_path.with_suffix(".lock")):
        if stats_path.is_file():  # an earlier member adapted the same frozen stages to the same images
            frozen.load_state_dict(torch.load(stats_path, map_location=device))
            frozen.eval()
        else:
            order = np.random.RandomState(0).permutation(len(train_set))[:ADAPT_IMAGES]
            adapt_batch_norms(frozen, batches(Subset(train_set.dataset, train_set.indices[order], transform)))
            atomic_write(stats_path, lambda tmp: torch.save(frozen.state_dict(), tmp))
    key = short_hash([FEATURES_VERSION, images_key, state_digest(frozen), flip, list(mean), list(std)])
    data_path, index_path = cache_dir / f"{key}.features", cache_dir / f"{key}.features.json"
    with torch.no_grad():
        sample = frozen(next(batches(Subset(train_set.dataset, train_set.indices[:1], transform)))[0])
    shape = (len(paths), 1 + flip, *sample.shape[1:])
    targets = [train_set.dataset.get_target(int(i)) for i in train_set.indices]

    def write(tmp):
        with open(tmp, "wb") as file, torch.no_grad():
            for images, _ in tqdm(batches(train_set), desc="features", total=-(-len(paths) // batch_size),
                                  leave=False, dynamic_ncols=True):
                file.write(with_mirror(frozen, images, flip).float().cpu().contiguous().numpy().tobytes())

    with locked(cache_dir / f"{key}.lock"):
        if not (index_path.is_file() and data_path.is_file()):
            atomic_write(data_path, write)
            write_json(index_path, dict(shape=list(shape), images=len(paths)))
    return FeatureSet(data_path, shape, targets, flip)


def frozen_outputs(frozen: nn.Module, loader, amp="off", tta="none", channels_last=False) -> torch.Tensor:
    """(N, views, C, H, W) float32: the frozen stages' output for every image of a (prefetch) loader,
    and with `tta="hflip"` for its mirror image too, kept in the CPU's memory (not the device's)."""
    frozen.eval()
    outputs = []
    with torch.no_grad(), autocast(loader.device, amp):
        for images, _ in loader:
            if channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            # float32 whatever the precision: the next run, which auto may time in another one, reuses it
            outputs.append(with_mirror(frozen, images, tta == "hflip").float().cpu())
    return torch.cat(outputs)


def predict_from_features(rest: FromFeatures, features: torch.Tensor, amp="off", batch_size=256,
                          channels_last=False) -> torch.Tensor:
    """18-class probabilities (N, 18) on the CPU from `frozen_outputs`: the mean over its views, as
    model.predict's flip TTA averages the plain and the mirror image's."""
    rest.eval()
    device = next(rest.parameters()).device
    probs = []
    with torch.no_grad(), autocast(device, amp):
        for batch in features.split(batch_size):
            batch = batch.to(device)
            views = [batch[:, v].contiguous(memory_format=torch.channels_last if channels_last else
                                            torch.contiguous_format) for v in range(batch.shape[1])]
            probs.append(torch.stack([probs18(rest(view)) for view in views]).mean(0).float().cpu())
    return torch.cat(probs) if probs else torch.zeros(0, 18)

"""Train a mask / gender / age classifier.

    python train.py --model resnet18 --epochs 10                 # one process, GPU if there is one
    torchrun --nproc_per_node=2 train.py --model resnet18        # DistributedDataParallel, same flags
"""
import argparse
import math
import os
import platform
import random
import shutil
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import timm
import timm.optim
import timm.scheduler
import torch
import torch.distributed as dist
from timm.utils import ModelEmaV3
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from augment import AUGMENTATIONS, DeviceAugment, check_augment_options, create_transforms, mix_batch
from cache import DEFAULT_CACHE_DIR, BadImagesError, DecodedCache, check_images, write_bad_images
from dataset import (
    DATASETS,
    SAMPLE_DIR,
    DataWarning,
    PrefetchLoader,
    Subset,
    fast_collate,
    make_sampler,
    scan_people,
    to_class_targets,
)
from features import FromFeatures, build_feature_set, check_supported
from loss import create_criterion, create_multi_head_loss
from metrics import save_confusion_png, score
from model import (
    AMP_CHOICES,
    CHANNELS_LAST_CHOICES,
    HEADS,
    MODEL_KINDS,
    autocast,
    build_model,
    checked_compile,
    freeze,
    predict,
    preprocessing,
)
from model import resolve_precision as model_precision
from report import write_report
from runs import (
    atomic_write,
    load_checkpoint,
    new_run_dir,
    one_line,
    one_line_errors,
    probability_frame,
    read_config,
    remove_stale_temporaries,
    save_checkpoint,
    write_csv,
    write_json,
)


class FlagError(Exception):
    """A bad flag value, reported as one line before any work starts."""


def key_values(items, cast=str):
    """["mask=focal", "age=f1"] -> {"mask": "focal", "age": "f1"}."""
    pairs = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise FlagError(f"expected head=value, got {item!r}")
        try:
            pairs[key] = cast(value)
        except ValueError:
            raise FlagError(f"{item!r}: {value!r} is not a {cast.__name__}") from None
    return pairs


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Train a mask / gender / age classifier.",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--config", help="YAML or JSON file setting any flag; command-line flags override it")
    data = parser.add_argument_group("data")
    data.add_argument("--data_dir", default=os.environ.get("SM_CHANNEL_TRAIN", str(SAMPLE_DIR / "train")),
                      help="train folder (images/ + train.csv) or its images/ folder")
    data.add_argument("--dataset", default="MultiLabelDataset", choices=list(DATASETS))
    data.add_argument("--augmentation", default="CustomAugmentation", choices=list(AUGMENTATIONS))
    data.add_argument("--resize", type=int, nargs=2, default=[128, 96], metavar=("H", "W"))
    data.add_argument("--crop", type=float, nargs=2, default=None, metavar=("H_FRAC", "W_FRAC"),
                      help="centre crop as fractions of the input (default: the augmentation's; 1 1: none)")
    data.add_argument("--val_ratio", type=float, default=0.2,
                      help="share of people held out for validation; 0: train on everyone for --epochs "
                           "(best.pth is the last epoch, no val_probs.csv)")
    data.add_argument("--n_folds", type=int, default=0, help="K-fold over people (0: a single split)")
    data.add_argument("--fold", type=int, default=None, help="train only this fold (default: all folds)")
    data.add_argument("--sampler", default="none", choices=["none", "class", "age"],
                      help="class-balanced sampling of the 18 classes or of the age groups")
    data.add_argument("--age_bins", type=int, nargs=2, default=[30, 60], metavar=("MIDDLE", "OLD"))
    data.add_argument("--drop_ages", type=int, nargs="*", default=[], help="ages left out of training, e.g. 57 58 59")
    data.add_argument("--relabel", default=None, help="CSV of label corrections (see README)")
    data.add_argument("--extra_data", nargs="*", default=[], metavar="DIR",
                      help="more train-layout folders (e.g. from synthesize.py) added to training only; "
                      "their people may have fewer than 7 images")
    data.add_argument("--skip_bad_images", action="store_true",
                      help="leave unreadable images out (with a warning) instead of stopping before the run")
    data.add_argument("--num_workers", type=int, default=min(4, os.cpu_count() or 1))
    data.add_argument("--cache", action="store_true",
                      help="decode, crop and resize every image once into a cache file, reused by later epochs "
                           "and runs")
    data.add_argument("--cache_dir", default=DEFAULT_CACHE_DIR,
                      help="the decoded cache and the record of images already checked")
    data.add_argument("--cache_features", action="store_true",
                      help="with --freeze N: compute the frozen stages' output for every image and its mirror "
                           "image once (kept in --cache_dir for later runs) and train the rest on it; flip is "
                           "then the only augmentation (EfficientNet backbones; see features.py)")
    augment = parser.add_argument_group("training augmentation (never applied to validation or inference)")
    augment.add_argument("--color_jitter", type=float, default=0.0, metavar="S",
                         help="brightness, contrast and saturation factors drawn in 1 +- S")
    augment.add_argument("--grayscale", type=float, default=0.0, metavar="P", help="probability of grayscale")
    augment.add_argument("--sharpness", type=float, default=0.0, metavar="S",
                         help="sharpness factor 1 + S, half the images")
    augment.add_argument("--noise", type=float, default=0.0, metavar="SIGMA",
                         help="gaussian noise, sigma as a fraction of the 0..255 range")
    augment.add_argument("--randaugment", type=int, nargs=2, default=None, metavar=("N", "M"),
                         help="torchvision RandAugment: N operations of magnitude M (0..30)")
    data.add_argument("--mixup", type=float, default=0.0, metavar="ALPHA", help="batch MixUp (Beta alpha; 0: off)")
    data.add_argument("--cutmix", type=float, default=0.0, metavar="ALPHA", help="batch CutMix (Beta alpha; 0: off)")
    data.add_argument("--mix_prob", type=float, default=0.5, help="share of batches mixed when --mixup/--cutmix")
    data.add_argument("--device_aug", action="store_true",
                      help="flip, crop and colour batch-wise on the device (GPU) instead of per image on the CPU")
    model = parser.add_argument_group("model")
    model.add_argument("--kind", default="three_head", choices=list(MODEL_KINDS))
    model.add_argument("--model", default="resnet18", help="timm backbone name")
    model.add_argument("--backbones", nargs="*", default=[], metavar="HEAD=NAME",
                       help="multi_backbone: a backbone per head, e.g. mask=convnext_tiny age=swin_s3_tiny_224")
    model.add_argument("--pretrained", default="none", help="none, timm (download) or a .pth/.safetensors file")
    model.add_argument("--freeze", default="none", help="none, all (train heads only) or N (train the last N stages)")
    model.add_argument("--drop_rate", type=float, default=0.0)
    model.add_argument("--drop_path_rate", type=float, default=0.0)
    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--epochs", type=int, default=10)
    optim.add_argument("--batch_size", type=int, default=64)
    optim.add_argument("--valid_batch_size", type=int, default=256)
    optim.add_argument("--optimizer", default="adamw", help="any of timm's optimizers: sgd, adam, adamw, lion, ...")
    optim.add_argument("--lr", type=float, default=1e-3)
    optim.add_argument("--weight_decay", type=float, default=0.01)
    optim.add_argument("--momentum", type=float, default=0.9)
    optim.add_argument("--scheduler", default="cosine", choices=["cosine", "step", "none"])
    optim.add_argument("--lr_decay_step", type=int, default=20, help="step: epochs between decays")
    optim.add_argument("--lr_gamma", type=float, default=0.5, help="step: decay factor")
    optim.add_argument("--warmup_epochs", type=float, default=0,
                       help="linear warmup from 1%% of --lr; a fraction of an epoch with --sched_on_updates")
    optim.add_argument("--sched_on_updates", action="store_true",
                       help="move the learning rate after every optimizer update (a smooth cosine to its end) "
                            "instead of once per epoch (timm's train.py flag)")
    optim.add_argument("--layer_decay", type=float, default=None, metavar="D",
                       help="layer-wise lr decay (timm's): the heads train at --lr, each backbone layer below "
                            "at D times the one above it, e.g. 0.9 (default: off)")
    optim.add_argument("--grad_accum", type=int, default=1, help="batches per optimizer step")
    optim.add_argument("--ema", type=float, default=0.0, metavar="DECAY",
                       help="keep an exponential moving average of the weights (timm's ModelEmaV3, decay warming "
                            "up to DECAY, e.g. 0.999); validation, best.pth and inference use it (0: off)")
    optim.add_argument("--amp", default="auto", choices=AMP_CHOICES,
                       help="mixed precision; auto: bf16 on GPUs (8.0+), fp16 on older GPUs (V100, T4); on a CPU "
                            "with native bf16 the faster of bf16 and fp32 as timed on the model (bf16 only if 10%% "
                            "faster); else off")
    optim.add_argument("--channels_last", nargs="?", const="on", default="auto", choices=CHANNELS_LAST_CHOICES,
                       help="channels-last memory format (bare flag: on); auto: on for convolutional models")
    optim.add_argument("--compile", action="store_true", help="torch.compile the model")
    optim.add_argument("--early_stop", type=int, default=0, help="stop after N epochs without a better F1 (0: off)")
    losses = parser.add_argument_group("loss")
    losses.add_argument("--criterion", nargs="+", default=["cross_entropy"], metavar="NAME",
                        help="one criterion for all heads (cross_entropy, focal, label_smoothing, f1, or a mix "
                             "like focal:0.6+f1:0.4), or one per head: mask=cross_entropy age=focal")
    losses.add_argument("--head_weights", nargs="*", default=[], metavar="HEAD=W", help="e.g. age=1.5")
    losses.add_argument("--focal_gamma", type=float, default=2.0)
    losses.add_argument("--smoothing", type=float, default=0.1)
    losses.add_argument("--age_soft", type=float, default=0.0, metavar="SIGMA",
                        help="age head: soft targets from the exact age, a Gaussian of SIGMA years over the groups "
                             "(0: hard groups); needs MultiLabelDataset and a model with heads")
    losses.add_argument("--age_years", type=float, default=0.0, metavar="W",
                        help="add an exact-age regression head (years) beside the three heads, its mean absolute "
                             "error in tens of years weighted W (0: off); val_probs.csv gets its ages (age_years) "
                             "for audit.py; needs MultiLabelDataset and --kind three_head")
    run = parser.add_argument_group("run")
    run.add_argument("--model_dir", default=os.environ.get("SM_MODEL_DIR", "./model"))
    run.add_argument("--name", default="exp", help="run folder name (exp, exp2, ... never overwrites)")
    run.add_argument("--seed", type=int, default=42)
    run.add_argument("--resume", default=None, help="a run folder (or its last.pth) to continue with its own "
                     "settings; only --epochs, --num_workers, --log_interval and --early_stop may change")
    run.add_argument("--log_interval", type=int, default=20, help="batches between loss checks")
    logging = parser.add_argument_group("logging")
    logging.add_argument("--wandb", action="store_true", help="log to Weights & Biases")
    logging.add_argument("--wandb_project", default="masktrain")
    logging.add_argument("--wandb_entity", default=None)
    logging.add_argument("--wandb_name", default=None, help="default: the run folder name")
    logging.add_argument("--wandb_mode", default="online", choices=["online", "offline"])
    logging.add_argument("--wandb_group", default=None, help="group runs in wandb (search.py: the study)")
    logging.add_argument("--report", default="on", choices=["on", "off"],
                         help="write report.html into the run folder at the end (without class activation maps)")
    return parser


def parse_args(argv=None) -> argparse.Namespace:
    parser = build_parser()
    known, _ = parser.parse_known_args(argv)
    if known.config:
        path = Path(known.config)
        if not path.is_file():
            parser.exit(2, f"error: --config file not found: {path}\n")
        import yaml
        values = yaml.safe_load(path.read_text()) or {}
        unknown = sorted(set(values) - {action.dest for action in parser._actions})
        if unknown:
            parser.exit(2, f"error: {path}: unknown settings {', '.join(unknown)}\n")
        parser.set_defaults(**values)
    return parser.parse_args(argv)


RESUME_OVERRIDES = {"epochs", "num_workers", "log_interval", "early_stop"}


def given_flags(argv=None) -> set:
    """The flags set on the command line (not by defaults)."""
    parser = build_parser()
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    return set(vars(parser.parse_known_args(argv)[0]))


def check_data(args, table, extra_table):
    """Decode every image once before the run (the decoded cache build is the check with --cache;
    files already checked unchanged cost nothing). Unreadable ones stop the run with their list, or
    with --skip_bad_images are left out: returns (table, extra table, [(path, reason)] left out)."""
    tables = [t for t in (table, extra_table) if t is not None]
    paths = pd.concat([t["path"] for t in tables], ignore_index=True).tolist()
    if args.cache:
        try:
            DecodedCache.build(paths, create_transforms(args.augmentation, args.resize, crop_fraction=args.crop)[1],
                               args.cache_dir, args.num_workers)
            bad = []
        except BadImagesError as error:
            bad = error.bad
    else:
        bad = check_images(paths, args.cache_dir, args.num_workers)
    if not bad:
        return table, extra_table, []
    listing = write_bad_images(bad, Path(args.model_dir) / "bad_images.csv")
    if not args.skip_bad_images:
        raise BadImagesError(bad, f"{listing}; fix or remove them, or pass --skip_bad_images")
    print(f"warning: leaving out {len(bad)} unreadable image(s) (--skip_bad_images), listed in {listing}",
          file=sys.stderr)
    dropped = {path for path, _ in bad}
    keep = [t[~t["path"].isin(dropped)].reset_index(drop=True) for t in tables]
    if len(keep[0]) == 0:
        raise FlagError(f"no readable images left in {args.data_dir}")
    return keep[0], keep[1] if extra_table is not None else None, bad


def augment_options(args) -> dict:
    """The optional training augmentations set by flags."""
    return dict(color_jitter=args.color_jitter, grayscale=args.grayscale, sharpness=args.sharpness, noise=args.noise,
                randaugment=args.randaugment)


def heads_of(kind) -> dict:
    return {"class": 18} if kind == "single_head" else HEADS


def has_validation(args) -> bool:
    """Whether the run holds people out (k-fold, or --val_ratio > 0); --val_ratio 0 trains on everyone."""
    return bool(args.n_folds) or args.val_ratio > 0


def validate(args):
    """Check every flag value before any work; raise FlagError with one line."""
    if not Path(args.data_dir).is_dir():
        raise FlagError(f"--data_dir not found: {args.data_dir}")
    for name in [args.model] + list(key_values(args.backbones).values()):
        if not timm.is_model(name):
            raise FlagError(f"--model: unknown timm model {name!r}")
    unknown_heads = set(key_values(args.backbones)) - set(HEADS)
    if unknown_heads:
        raise FlagError(f"--backbones: unknown heads {sorted(unknown_heads)}; heads are mask, gender, age")
    if args.optimizer.lower() not in timm.optim.list_optimizers() and args.optimizer.lower() != "sgd":
        raise FlagError(f"--optimizer: unknown optimizer {args.optimizer!r} (timm's: sgd, adam, adamw, lion, ...)")
    if args.crop is not None and not all(0 < f <= 1 for f in args.crop):
        raise FlagError(f"--crop fractions must be in (0, 1], got {args.crop}")
    if min(args.resize) <= 0:
        raise FlagError(f"--resize must be positive, got {args.resize}")
    if args.n_folds == 1 or args.n_folds < 0:
        raise FlagError(f"--n_folds must be 0 (one split) or at least 2, got {args.n_folds}")
    if args.fold is not None and not (args.n_folds >= 2 and 0 <= args.fold < args.n_folds):
        raise FlagError(f"--fold {args.fold} needs 0 <= fold < --n_folds ({args.n_folds})")
    if not 0 <= args.val_ratio < 1 and not args.n_folds:
        raise FlagError(f"--val_ratio must be in [0, 1), got {args.val_ratio}")
    if not has_validation(args) and args.early_stop:
        raise FlagError("--early_stop needs validation: drop it or use --val_ratio > 0")
    if args.epochs <= 0 or args.batch_size <= 0 or args.grad_accum <= 0:
        raise FlagError("--epochs, --batch_size and --grad_accum must be positive")
    if args.valid_batch_size <= 0 or args.num_workers < 0:
        raise FlagError(f"--valid_batch_size must be positive and --num_workers >= 0, got {args.valid_batch_size} "
                        f"and {args.num_workers}")
    if args.early_stop < 0:
        raise FlagError(f"--early_stop must be >= 0 (0: off), got {args.early_stop}")
    if args.mixup < 0 or args.cutmix < 0 or not 0 <= args.mix_prob <= 1:
        raise FlagError(f"--mixup and --cutmix must be >= 0 (0: off) and --mix_prob in [0, 1], got {args.mixup}, "
                        f"{args.cutmix} and {args.mix_prob}")
    if not 0 <= args.ema < 1:
        raise FlagError(f"--ema DECAY must be in [0, 1) (0: off), got {args.ema}")
    if not 0 <= args.warmup_epochs < args.epochs:
        raise FlagError(f"--warmup_epochs must be in [0, --epochs), got {args.warmup_epochs}")
    if args.layer_decay is not None and not 0 < args.layer_decay <= 1:
        raise FlagError(f"--layer_decay must be in (0, 1], got {args.layer_decay}")
    if args.warmup_epochs % 1 and not args.sched_on_updates:
        raise FlagError(f"--warmup_epochs {args.warmup_epochs}: a fraction of an epoch needs --sched_on_updates")
    for folder in args.extra_data:
        if not Path(folder).is_dir():
            raise FlagError(f"--extra_data folder not found: {folder}")
    if args.relabel and not Path(args.relabel).is_file():
        raise FlagError(f"--relabel file not found: {args.relabel}")
    if args.pretrained not in ("none", "timm") and not Path(args.pretrained).is_file():
        raise FlagError(f"--pretrained: weights file not found: {args.pretrained}")
    criteria = criterion_spec(args)
    try:
        for head, n in heads_of(args.kind).items():
            name = criteria.get(head, "cross_entropy") if isinstance(criteria, dict) else criteria
            create_criterion(name, n)
        freeze_spec = str(args.freeze)
        if freeze_spec not in ("none", "all") and not freeze_spec.isdigit():
            raise ValueError(f"--freeze must be none, all or a number of last stages, got {freeze_spec!r}")
        check_augment_options(**augment_options(args))
    except ValueError as error:
        raise FlagError(str(error)) from None
    if args.cache_features:
        check_cache_features(args)
    if args.age_soft < 0 or (args.age_soft and (args.dataset != "MultiLabelDataset" or args.kind == "single_head")):
        raise FlagError("--age_soft needs a SIGMA >= 0, --dataset MultiLabelDataset and a model with heads")
    if args.age_years < 0 or (args.age_years and (args.dataset != "MultiLabelDataset" or args.kind != "three_head")):
        raise FlagError("--age_years needs a weight W >= 0, --dataset MultiLabelDataset and --kind three_head")
    if isinstance(criteria, dict) and args.kind == "single_head":
        raise FlagError("--criterion per head needs a three_head or multi_backbone model")
    try:
        weights = key_values(args.head_weights, float)
    except FlagError as error:
        raise FlagError(f"--head_weights: {error}") from None
    if set(weights) - set(HEADS) or any(not (w >= 0) for w in weights.values()):
        raise FlagError("--head_weights: heads are mask, gender, age, each weight a number >= 0")


def check_cache_features(args):
    """--cache_features trains on fixed features: only a mirror flip can be drawn per image."""
    if str(args.freeze) == "none":
        raise FlagError("--cache_features needs --freeze N (the frozen stages are what it computes once)")
    if args.kind == "multi_backbone":
        raise FlagError("--cache_features needs one shared backbone: --kind three_head or single_head")
    if args.augmentation not in ("BaseAugmentation", "CustomAugmentation"):
        raise FlagError(f"--cache_features allows a mirror flip only, not --augmentation {args.augmentation}")
    others = [flag for flag, on in [("--color_jitter", args.color_jitter), ("--grayscale", args.grayscale),
                                    ("--sharpness", args.sharpness), ("--noise", args.noise),
                                    ("--randaugment", args.randaugment), ("--mixup", args.mixup),
                                    ("--cutmix", args.cutmix), ("--device_aug", args.device_aug),
                                    ("--compile", args.compile)] if on]
    if others:
        raise FlagError(f"--cache_features trains on fixed features: drop {', '.join(others)}")


def criterion_spec(args):
    """--criterion as one name, or {head: name}."""
    if len(args.criterion) == 1 and "=" not in args.criterion[0]:
        return args.criterion[0]
    spec = key_values(args.criterion)
    if set(spec) - set(HEADS):
        raise FlagError(f"--criterion: unknown heads {sorted(set(spec) - set(HEADS))}; heads are mask, gender, age")
    return spec


# ---------------------------------------------------------------- distributed
def setup_distributed():
    """(rank, world size, device): torchrun sets WORLD_SIZE; CUDA uses NCCL, CPU uses gloo."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world == 1:
        return 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl")
        return dist.get_rank(), world, torch.device("cuda", local_rank)
    dist.init_process_group("gloo")
    return dist.get_rank(), world, torch.device("cpu")


def report_data_once(rank):
    """Under torchrun every rank reads the train folder; only rank 0 prints what it found wrong."""
    if rank != 0:
        warnings.filterwarnings("ignore", category=DataWarning)


def gather(obj, world):
    """All ranks' `obj` as a list (just [obj] in one process)."""
    if world == 1:
        return [obj]
    objects = [None] * world
    dist.all_gather_object(objects, obj)
    return objects


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ---------------------------------------------------------------- one run
def run_config(args, model, run_dir, fold) -> dict:
    """Every resolved setting plus what rebuilds the model and its preprocessing."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    config = {key: value for key, value in vars(args).items() if key != "resume"}
    defaults = vars(build_parser().parse_args([]))
    config.update(changed_flags=[key for key, value in config.items() if key in defaults and value != defaults[key]])
    config.update(fold=fold, run_dir=str(run_dir), preprocessing=preprocessing(model), heads=heads_of(args.kind),
                  model_args=model_args(args),
                  git_commit=commit or None, versions=dict(python=platform.python_version(), torch=torch.__version__,
                                                           timm=timm.__version__, numpy=np.__version__))
    return config


def model_args(args) -> dict:
    """The arguments of `model.build_model` (saved in config.json to rebuild the model)."""
    return dict(kind=args.kind, model=args.model, backbones=key_values(args.backbones), drop_rate=args.drop_rate,
                drop_path_rate=args.drop_path_rate, age_years=args.age_years > 0)


def make_loaders(args, dataset, model, rank, world, device):
    train_tf, val_tf = create_transforms(args.augmentation, args.resize, crop_fraction=args.crop,
                                         **augment_options(args))
    if args.device_aug:
        train_tf = val_tf  # the device does the random part
    if args.cache:
        dataset.cache = DecodedCache.build(dataset.table["path"], val_tf, args.cache_dir, args.num_workers)
    train_set, val_set = dataset.split_dataset(train_tf, val_tf)
    if len(train_set) == 0 or (len(val_set) == 0 and has_validation(args)):
        raise FlagError(f"the split left {len(train_set)} training and {len(val_set)} validation images: "
                        "use more people or another --val_ratio")
    generator = torch.Generator()
    sampler = None
    if args.sampler != "none":
        if world > 1:
            raise FlagError("--sampler does not work under torchrun yet: drop it or run one process")
        sampler = make_sampler(train_set.targets("class" if args.sampler == "class" else "age_label"), args.seed)
        generator = sampler.generator
    elif world > 1:
        sampler = torch.utils.data.DistributedSampler(train_set, world, rank, shuffle=True, seed=args.seed)
    val_shard = Subset(val_set.dataset, val_set.indices[rank::world], val_tf)
    config = preprocessing(model)
    if args.cache_features:
        if world > 1:
            raise FlagError("--cache_features does not work under torchrun yet: drop it or run one process")
        train_set = build_feature_set(model, train_set, val_tf, config["mean"], config["std"], args.cache_dir,
                                      device, args.channels_last in (True, "on", "auto"),
                                      flip=args.augmentation == "CustomAugmentation")
    common = dict(num_workers=args.num_workers, collate_fn=fast_collate, pin_memory=device.type == "cuda")
    remainder = len(train_set) // world % args.batch_size  # a last batch of 1 breaks batch norm; of another
    drop_last = remainder == 1 or (args.compile and remainder > 0)  # size, a recompile under --compile
    train_loader = DataLoader(train_set, args.batch_size, shuffle=sampler is None, sampler=sampler,
                              generator=generator, drop_last=drop_last, **common)
    val_loader = DataLoader(val_shard, args.valid_batch_size, shuffle=False, **common)
    augment = DeviceAugment(generator=generator) if args.device_aug else None
    normalise = (None, None) if args.cache_features else (config["mean"], config["std"])  # features: as they are
    return (PrefetchLoader(train_loader, *normalise, device, augment=augment), generator,
            PrefetchLoader(val_loader, config["mean"], config["std"], device), val_shard)


def resolve_precision(args, model, device, world=1, resumed=None, features_shape=None):
    """`args` with --amp and --channels_last resolved for this model and device (what the loop
    uses), and the one-line explanation the run header prints. On a CPU with native bf16, auto times
    training steps of the model in bf16 and fp32 and takes the faster (rank 0's choice for every rank);
    with --cache_features, steps of the layers after the frozen ones on features, what the loop runs.
    A run resumed (`resumed`: its saved config) on the same kind of device keeps the precision it was
    trained in: auto's timing could otherwise pick the other one mid-run."""
    if resumed and resumed.get("device_type") == device.type and "amp_resolved" in resumed:
        amp, channels_last = resumed["amp_resolved"], resumed["channels_last_resolved"]
        line = f"amp {amp}, channels_last {'on' if channels_last else 'off'}: as the resumed run was trained"
    else:
        timed, size = (FromFeatures(model), features_shape[2:]) if features_shape else (model, args.resize)
        amp, channels_last, line = model_precision(timed, args.amp, args.channels_last, device, size,
                                                   args.batch_size, agree=lambda choice: gather(choice, world)[0])
    return argparse.Namespace(**{**vars(args), "amp": amp, "channels_last": channels_last}), line


def evaluate(model, loader, val_shard, args, world):
    """Predictions over the *whole* validation set, gathered from every rank, in image order:
    (indices, 18-class probabilities, class targets, the years head's ages or None)."""
    probs, targets, years = predict(model, loader, args.amp, channels_last=args.channels_last, with_years=True)
    years = None if years is None else years.numpy()
    parts = gather((val_shard.indices.tolist(), probs.numpy(), to_class_targets(targets).numpy(), years), world)
    indices = np.concatenate([p[0] for p in parts]).astype(int)
    order = np.argsort(indices)
    probs = np.concatenate([p[1] for p in parts])[order]
    targets = np.concatenate([p[2] for p in parts])[order]
    years = None if years is None else np.concatenate([p[3] for p in parts])[order]
    return indices[order], probs, targets, years


def train_run(args, table, extra_table, fold, run_dir, rank, world, device, skipped=(), on_epoch=None) -> float:
    """Train one model into `run_dir`; return its best validation macro F1. `skipped`: the
    unreadable images left out, recorded in the run."""
    seed_everything(args.seed)
    is_main = rank == 0
    dataset = DATASETS[args.dataset](table=table, val_ratio=args.val_ratio, seed=args.seed, n_folds=args.n_folds,
                                     fold=fold or 0, drop_ages=args.drop_ages, extra_table=extra_table,
                                     exact_age=args.age_soft > 0 or args.age_years > 0)
    pretrained = False if args.pretrained == "none" else True if args.pretrained == "timm" else args.pretrained
    model = build_model(pretrained=pretrained, **model_args(args))
    trainable, total = freeze(model, args.freeze)
    if args.cache_features and (unsupported := check_supported(model)):
        raise FlagError(unsupported)
    train_loader, generator, val_loader, val_shard = make_loaders(args, dataset, model, rank, world, device)
    config = run_config(args, model, run_dir, fold)  # the flags as asked ...
    state = None
    if args.resume:
        state = load_checkpoint(Path(args.resume) / "last.pth" if Path(args.resume).is_dir() else args.resume,
                                device)
    args, precision = resolve_precision(args, model, device, world,  # ... and as this device runs them
                                        resumed=state and state.get("config"),
                                        features_shape=train_loader.dataset.shape if args.cache_features else None)
    config.update(amp_resolved=args.amp, channels_last_resolved=args.channels_last, device_type=device.type,
                  skipped_images=len(skipped))
    n_val = sum(gather(len(val_shard), world))
    if is_main:
        write_json(run_dir / "config.json", config)
        if skipped:
            write_bad_images(skipped, run_dir / "skipped_images.csv")
    model.to(device, memory_format=torch.channels_last if args.channels_last else torch.preserve_format)
    optimizer = timm.optim.create_optimizer_v2(model, opt=args.optimizer, lr=args.lr,
                                               weight_decay=args.weight_decay, momentum=args.momentum,
                                               layer_decay=args.layer_decay)
    scheduler = None
    if args.scheduler != "none":
        scheduler, _ = timm.scheduler.create_scheduler_v2(
            optimizer, sched=args.scheduler, num_epochs=args.epochs, decay_epochs=args.lr_decay_step,
            decay_rate=args.lr_gamma, warmup_epochs=args.warmup_epochs, warmup_lr=args.lr * 0.01, min_lr=args.lr * 0.01,
            step_on_epochs=not args.sched_on_updates, updates_per_epoch=updates_per_epoch(train_loader, args))
    if scheduler is None:  # timm's schedulers apply --layer_decay's per-group lr_scale; without one, do it here
        for group in optimizer.param_groups:
            group["lr"] *= group.get("lr_scale", 1.0)
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == "fp16")
    ema = ModelEmaV3(model, decay=args.ema, use_warmup=True, warmup_power=3 / 4) if args.ema else None
    scored = ema.module if ema else model  # the weights validation, best.pth and inference use
    criterion = create_multi_head_loss(criterion_spec(args), heads_of(args.kind), key_values(args.head_weights, float),
                                       gamma=args.focal_gamma, smoothing=args.smoothing, age_soft=args.age_soft,
                                       age_bins=args.age_bins, age_years=args.age_years).to(device)
    start_epoch, best_f1, since_best, log = 0, -1.0, 0, []
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        if ema is not None:
            ema.module.load_state_dict(state["ema"])
        start_epoch, best_f1, since_best, log = state["epoch"], state["best_f1"], state["since_best"], state["log"]
        if scheduler is not None:  # a function of the epoch or update: this also allows more --epochs (the first
            scheduler.step(start_epoch)  # update then takes the longer schedule's lr, not the saved one)
            scheduler.step_update(start_epoch * updates_per_epoch(train_loader, args))
        if is_main:
            remove_stale_temporaries(run_dir)
            print(f"resumed at epoch {start_epoch + 1} (best F1 so far {best_f1:.4f})")
    train_model = FromFeatures(model) if args.cache_features else model  # the same modules, fed features
    if args.compile:
        train_model, fallback = checked_compile(model, (args.batch_size, 3, *args.resize), device, args.amp,
                                                args.channels_last)
        if fallback and is_main:
            print(f"warning: --compile: {fallback}", file=sys.stderr)
    if world > 1:
        train_model = DistributedDataParallel(train_model, device_ids=[device.index] if device.type == "cuda" else None)

    def checkpoint(epoch):
        return dict(model=model.state_dict(), ema=ema.module.state_dict() if ema else None,
                    optimizer=optimizer.state_dict(), scaler=scaler.state_dict(),
                    scheduler=scheduler.state_dict() if scheduler else None, epoch=epoch, best_f1=best_f1,
                    since_best=since_best, log=log, config=config,
                    rng=dict(python=random.getstate(), numpy=np.random.get_state(), torch=torch.get_rng_state()))

    if is_main:
        if not args.resume:  # from here on the run folder can always be resumed, even after a kill
            save_checkpoint(run_dir / "last.pth", checkpoint(0))
        print(f"run {run_dir}: {len(train_loader.dataset)} train / {n_val} val "
              f"images, {trainable:,} of {total:,} parameters trainable, device {device}, {world} process(es)")
        print(precision, flush=True)
    wandb_run = start_wandb(args, config, run_dir) if args.wandb and is_main else None
    epoch = start_epoch
    try:
        for epoch in range(start_epoch, args.epochs):
            seed_everything(args.seed + epoch)
            generator.manual_seed(args.seed + epoch)
            if isinstance(train_loader.sampler, torch.utils.data.DistributedSampler):
                train_loader.sampler.set_epoch(epoch)
            row = train_epoch(train_model, train_loader, criterion, optimizer, scaler, args, epoch, device, is_main,
                              ema=ema, ema_source=model, scheduler=scheduler)
            if scheduler is not None:
                scheduler.step(epoch + 1)
            if n_val:
                indices, probs, targets, years = evaluate(scored, val_loader, val_shard, args, world)
                row.update(val_loss=val_loss(probs, targets),
                           **{f"val_{k}": v for k, v in score(targets, probs).items()})
                if years is not None:
                    row["val_years_mae"] = float(np.abs(years - dataset.table["age"].to_numpy()[indices]).mean())
            log.append(row)
            improved = not n_val or row["val_f1"] > best_f1  # without validation the last epoch is the best
            best_f1, since_best = (row.get("val_f1", float("nan")), 0) if improved else (best_f1, since_best + 1)
            if is_main:
                scores = (f"val loss {row['val_loss']:.4f}  val F1 {row['val_f1']:.4f}  mask/gender/age acc "
                          f"{row['val_mask_acc']:.3f}/{row['val_gender_acc']:.3f}/{row['val_age_acc']:.3f}"
                          if n_val else "no validation (--val_ratio 0)")
                print(f"epoch {epoch + 1}/{args.epochs}: loss {row['train_loss']:.4f}  {scores}  "
                      f"{row['images_per_second']:.0f} img/s" + ("  *best*" if improved and n_val else ""))
                write_csv(run_dir / "log.csv", pd.DataFrame(log))
                if improved:
                    save_checkpoint(run_dir / "best.pth", dict(model=scored.state_dict(), epoch=epoch + 1, f1=best_f1,
                                                               config=config))
                    if n_val:
                        save_best_epoch_files(run_dir, dataset, indices, probs, targets, epoch, years)
                save_checkpoint(run_dir / "last.pth", checkpoint(epoch + 1))
                if wandb_run is not None:
                    wandb_run.log(row, step=epoch + 1)
                if on_epoch is not None:
                    on_epoch(epoch + 1, row, fold)
            if args.early_stop and since_best >= args.early_stop:
                if is_main:
                    print(f"early stop: no better F1 for {since_best} epochs")
                break
    except KeyboardInterrupt:
        if is_main:
            save_checkpoint(run_dir / "last.pth", checkpoint(epoch))
            print(f"\ninterrupted: saved {run_dir / 'last.pth'}; continue with --resume {run_dir}")
        raise
    finally:
        if wandb_run is not None:
            wandb_run.finish()
    if is_main:
        print(f"best validation macro F1 {best_f1:.4f}; run folder {run_dir}" if n_val else
              f"trained on every image for {args.epochs} epochs (best.pth is the last epoch); run folder {run_dir}")
        if args.report == "on":
            try:
                print(f"report: {write_report(run_dir, cams=False)} (python report.py {run_dir} adds where the "
                      "heads look)")
            except Exception as error:  # a report must never cost the run
                print(f"warning: no report.html ({one_line(error)})", file=sys.stderr)
    return best_f1


def head_lr(optimizer) -> float:
    """The learning rate of the heads: the largest of the groups (with --layer_decay the backbone's are lower)."""
    return max(group["lr"] for group in optimizer.param_groups)


def updates_per_epoch(loader, args) -> int:
    """Optimizer steps in one pass over `loader` (the last partial --grad_accum group counts as one)."""
    return math.ceil(len(loader) / args.grad_accum)


def train_epoch(model, loader, criterion, optimizer, scaler, args, epoch, device, is_main, ema=None,
                ema_source=None, scheduler=None) -> dict:
    """One pass over the training data; returns the epoch's log row (train losses, lr, speed). `ema`
    (a ModelEmaV3) follows `ema_source` (the unwrapped model) after every optimizer step; a timm
    `scheduler` made with step_on_epochs=False moves the learning rate then too."""
    updates_before = epoch * updates_per_epoch(loader, args)
    model.train()
    sums, seen, started = {}, 0, time.time()
    optimizer.zero_grad(set_to_none=True)
    bar = tqdm(loader, desc=f"epoch {epoch + 1}/{args.epochs}", disable=not is_main, leave=False, dynamic_ncols=True)
    for step, (images, targets) in enumerate(bar):
        if args.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        mixing = (args.mixup > 0 or args.cutmix > 0) and random.random() < args.mix_prob
        if mixing:
            images, permutation, lam = mix_batch(images, args.mixup, args.cutmix)
        with autocast(device, args.amp):
            outputs = model(images)
            total, parts = criterion(outputs, targets)
            if mixing:
                total_b, parts_b = criterion(outputs, targets[permutation])
                total = lam * total + (1 - lam) * total_b
                parts = {head: lam * parts[head] + (1 - lam) * parts_b[head] for head in parts}
        scaler.scale(total / args.grad_accum).backward()
        if (step + 1) % args.grad_accum == 0 or step + 1 == len(loader):
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            updates = updates_before + step // args.grad_accum + 1
            if ema is not None:
                ema.update(ema_source, step=updates)
            if scheduler is not None:
                scheduler.step_update(updates)  # a no-op for a schedule that moves per epoch
        for key, value in [("train_loss", total)] + [(f"train_loss_{h}", v) for h, v in parts.items()]:
            sums[key] = sums.get(key, 0.0) + value.detach() * len(images)
        seen += len(images)
        if (step + 1) % args.log_interval == 0 or step + 1 == len(loader):
            loss = sums["train_loss"].item() / seen
            if not math.isfinite(loss):
                raise FloatingPointError(f"training loss became {loss} at epoch {epoch + 1}, step {step + 1}: "
                                         "lower --lr, or use --amp bf16 / off")
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{head_lr(optimizer):.2e}",
                            img_s=f"{seen / (time.time() - started):.0f}")
    seconds = time.time() - started
    row = {"epoch": epoch + 1, **{k: v.item() / max(seen, 1) for k, v in sums.items()},
           "lr": head_lr(optimizer), "epoch_seconds": seconds,
           "images_per_second": seen / max(seconds, 1e-9)}
    return row


def val_loss(probs, targets) -> float:
    """Cross entropy of the 18-class probabilities (comparable across model kinds)."""
    picked = probs[np.arange(len(targets)), targets] if len(targets) else np.ones(1)
    return float(-np.log(np.clip(picked, 1e-12, 1)).mean())


def save_best_epoch_files(run_dir, dataset, indices, probs, targets, epoch, years=None):
    """The best epoch's confusion matrix PNG and validation probabilities (out-of-fold predictions),
    with the years head's ages as `age_years` where the model has it."""
    atomic_write(run_dir / "confusion_matrix.png",
                 lambda tmp: save_confusion_png(tmp, targets, probs, f"{run_dir.name}, epoch {epoch + 1}"))
    root = Path(dataset.table["path"].iloc[0]).parents[1]
    ids = [str(Path(p).relative_to(root)) for p in dataset.table["path"].iloc[indices]]
    frame = probability_frame(ids, probs)
    frame.insert(1, "ans", targets)
    if years is not None:
        frame["age_years"] = years
    write_csv(run_dir / "val_probs.csv", frame)


def start_wandb(args, config, run_dir):
    import wandb
    return wandb.init(project=args.wandb_project, entity=args.wandb_entity, name=args.wandb_name or run_dir.name,
                      mode=args.wandb_mode, dir=str(run_dir), config=config, group=args.wandb_group)


# ---------------------------------------------------------------- main
def main(argv=None, on_epoch=None) -> list:
    """Run train.py with `argv`; return the best validation macro F1 of each fold. `on_epoch(epoch,
    log_row, fold)` (the hook of tools such as search.py) is called after every saved epoch; an
    exception it raises stops the run, its checkpoints kept."""
    args = parse_args(argv)
    if args.resume:
        resume = Path(args.resume)
        run_dir = resume if resume.is_dir() else resume.parent
        if not (run_dir / "last.pth").is_file():
            raise SystemExit(f"error: --resume: {run_dir} has no last.pth")
        saved = read_config(run_dir, "last")
        keep = {k: getattr(args, k) for k in RESUME_OVERRIDES | {"resume"} if k in given_flags(argv) | {"resume"}}
        args = argparse.Namespace(**{**vars(args), **{k: v for k, v in saved.items() if hasattr(args, k)}, **keep})
    try:
        validate(args)
    except FlagError as error:
        raise SystemExit(f"error: {error}") from None
    rank, world, device = setup_distributed()
    report_data_once(rank)
    run_dirs = []
    try:
        with one_line_errors(FlagError, FloatingPointError):
            try:
                table = scan_people(args.data_dir, tuple(args.age_bins), args.relabel, check_images=False)
                extra_tables = [scan_people(d, tuple(args.age_bins), check_images=False, expect_complete=False)
                                for d in args.extra_data]
                extra_table = pd.concat(extra_tables, ignore_index=True) if extra_tables else None
                table, extra_table, skipped = check_data(args, table, extra_table)
                folds = [args.fold] if args.fold is not None else list(range(args.n_folds)) if args.n_folds else [None]
                if args.resume:
                    folds, run_dirs = [saved["fold"]], [run_dir]
                else:
                    suffixes = [f"_fold{k}" for k in folds] if folds != [None] else [""]
                    base = new_run_dir(args.model_dir, args.name, suffixes) if rank == 0 else None
                    base = gather(base, world)[0]
                    run_dirs = [Path(args.model_dir) / f"{base}{s}" for s in suffixes]
                scores = [train_run(args, table, extra_table, fold, run_dir, rank, world, device, skipped, on_epoch)
                          for fold, run_dir in zip(folds, run_dirs, strict=True)]
            except Exception:
                if rank == 0 and not args.resume:
                    remove_unfinished(run_dirs)
                raise
    finally:
        if world > 1:
            dist.destroy_process_group()
    if len(scores) > 1 and rank == 0:
        summary = dict(folds=[str(d) for d in run_dirs], f1=scores, mean=float(np.mean(scores)),
                       std=float(np.std(scores)))
        write_json(Path(args.model_dir) / f"{base}_cv.json", summary)
        print(f"{len(scores)} folds: macro F1 {summary['mean']:.4f} +- {summary['std']:.4f}")
    return scores


def remove_unfinished(run_dirs):
    """Delete the run folders of a failed run that never saved a best checkpoint (nothing to lose)."""
    for run_dir in run_dirs:
        if run_dir.is_dir() and not (run_dir / "best.pth").is_file():
            shutil.rmtree(run_dir, ignore_errors=True)


if __name__ == "__main__":
    main()

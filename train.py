"""Train a mask / gender / age classifier (its flags and their checks: flags.py).

    python train.py --model resnet18 --epochs 10                 # one process, GPU if there is one
    torchrun --nproc_per_node=2 train.py --model resnet18        # DistributedDataParallel, same flags
"""
import math
import os
import platform
import random
import shutil
import subprocess
import sys
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import timm
import timm.optim
import timm.scheduler
import torch
import torch.distributed as dist
from timm.data.random_erasing import RandomErasing
from timm.utils import ModelEmaV3, dispatch_clip_grad, distribute_bn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from augment import DeviceAugment, create_transforms, mix_batch
from cache import BadImagesError, DecodedCache, check_images, write_bad_images
from dataset import (
    DATASETS,
    DataWarning,
    PrefetchLoader,
    Subset,
    fast_collate,
    make_sampler,
    scan_people,
    to_class_targets,
)
from faces import face_record, find_faces, found_line, write_no_face
from features import FromFeatures, build_feature_set, check_supported
from flags import (
    FlagError,
    augment_options,
    build_parser,
    criterion_spec,
    given_flags,
    has_validation,
    key_values,
    parse_args,
    resumed_args,
    validate,
)
from labels import heads_of
from loss import create_multi_head_loss
from metrics import save_confusion_png, score
from model import build_model, fetch_pretrained, freeze, is_source, model_sources, predict, preprocessing, weights_line
from precision import (
    AMP_TIMINGS,
    DeviceError,
    Precision,
    autocast,
    checked_compile,
    resolve_amp,
    resolve_channels_last,
    resolve_precision,
    select_device,
)
from run_page import write_report
from runs import (
    atomic_write,
    load_checkpoint,
    new_run_dir,
    one_line,
    one_line_errors,
    probability_frame,
    remove_stale_temporaries,
    run_command,
    save_checkpoint,
    write_csv,
    write_json,
)
from spec import Preprocess, RunSpec, TrainOptions


# ---------------------------------------------------------------- the images, checked once
def find_run_faces(args, table, extra_table) -> tuple:
    """With --face_crop, the face box of every image (found once: later runs read them from --cache_dir) and
    the tables with each image's crop square as their `region` column: (table, extra table, FaceCrop or None)."""
    if not args.face_crop:
        return table, extra_table, None
    paths = pd.concat([t["path"] for t in (table, extra_table) if t is not None], ignore_index=True).tolist()
    faces = find_faces(paths, args.face_detector, args.face_score, args.face_margin, args.cache_dir, args.num_workers)
    table, extra_table = (None if t is None else t.assign(region=pd.Series(faces.regions(t["path"]), index=t.index,
                                                                           dtype=object))
                          for t in (table, extra_table))
    return table, extra_table, faces


def check_data(args, table, extra_table):
    """Decode every image once before the run (the decoded cache build is the check with --cache;
    files already checked unchanged cost nothing). Unreadable ones stop the run with their list, or
    with --skip_bad_images are left out: returns (table, extra table, [(path, reason)] left out)."""
    tables = [t for t in (table, extra_table) if t is not None]
    paths = pd.concat([t["path"] for t in tables], ignore_index=True).tolist()
    if args.cache:
        try:
            transform = create_transforms(args.augmentation, args.resize, crop_fraction=args.crop)[1]
            regions = pd.concat([t["region"] for t in tables], ignore_index=True).tolist() if args.face_crop else None
            DecodedCache.build(paths, transform, args.cache_dir, args.num_workers, regions=regions)
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


# ---------------------------------------------------------------- distributed
def setup_distributed(asked="auto"):
    """(rank, world size, device) for --device `asked` (a GPU this torch cannot use is a one-line error
    before any work). Started by torchrun (LOCAL_RANK is set), the process group is started even for one
    process: NCCL on CUDA, gloo on a CPU; DDP then wraps the model."""
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = select_device(asked, local_rank)
    if not {"LOCAL_RANK", "RANK", "WORLD_SIZE", "MASTER_ADDR"} <= set(os.environ):  # what torchrun sets
        return 0, 1, device
    if device.type == "cuda":
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        dist.init_process_group("gloo")
    return dist.get_rank(), dist.get_world_size(), device


def distributed() -> bool:
    """Whether this process is one of a torchrun process group (of any size)."""
    return dist.is_available() and dist.is_initialized()


def check_one_process(args) -> None:
    """The flags that do not work under torchrun yet, refused before any work."""
    for flag, on in (("--sampler", args.sampler != "none"), ("--cache_features", args.cache_features)):
        if on and distributed():
            raise FlagError(f"{flag} does not work under torchrun yet: drop it or run one process")


def report_data_once(rank):
    """Under torchrun every rank reads the train folder; only rank 0 prints what it found wrong."""
    if rank != 0:
        warnings.filterwarnings("ignore", category=DataWarning)


def gather(obj, world):
    """All ranks' `obj` as a list (just [obj] in one process)."""
    if not distributed():
        return [obj]
    objects = [None] * world
    dist.all_gather_object(objects, obj)
    return objects


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def seed_worker(worker_id):
    """Loader workers' numpy seeded from torch's per-worker seed (torch seeds `random` and itself; numpy
    would otherwise repeat the parent's state in every worker)."""
    np.random.seed(torch.initial_seed() % 2**32)


def set_deterministic(asked, device) -> bool:
    """--deterministic: auto is on for CPUs and off for GPUs (cuDNN's fastest kernels are not deterministic;
    `on` there also sets CUBLAS_WORKSPACE_CONFIG). An op with no deterministic kernel warns instead of
    stopping the run. Off on a GPU, cuDNN picks the fastest kernels for each input shape (benchmark mode,
    as timm's train.py does). Returns whether it is on."""
    on = asked == "on" or (asked == "auto" and device.type != "cuda")
    if on and device.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.backends.cudnn.benchmark = device.type == "cuda" and not on  # cuDNN times its kernels once per shape
    torch.use_deterministic_algorithms(on, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = False  # a debugging aid that costs time; no result uses it
    return on


# ---------------------------------------------------------------- one run
class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C inside the loop, after last.pth was saved and the resume command printed."""


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
                  model_args=model_args(args), starting_weights=starting_weight_lines(args),
                  git_commit=commit or None, versions=dict(python=platform.python_version(), torch=torch.__version__,
                                                           timm=timm.__version__, numpy=np.__version__))
    return config


def model_args(args) -> dict:
    """The arguments of `model.build_model` (saved in config.json to rebuild the model, model sources
    with their architecture and preprocessing)."""
    backbones = key_values(args.backbones)
    return dict(kind=args.kind, model=args.model, backbones=backbones, drop_rate=args.drop_rate,
                drop_path_rate=args.drop_path_rate, age_years=args.age_years > 0,
                sources=model_sources([args.model, *backbones.values()]), img_size=list(args.resize))


def pretrained_choice(args):
    """`build_model`'s `pretrained` for --pretrained: auto and timm True (a timm name's pretrained weights,
    a source's own), none False, a file its path."""
    return False if args.pretrained == "none" else True if args.pretrained in ("auto", "timm") else args.pretrained


def make_loaders(args, preprocess, dataset, model, place):
    """(training loader, its generator, validation loader, this rank's validation shard): images prepared as
    `preprocess` (spec.Preprocess) says, each cropped at its own region where the dataset has one (face
    squares), normalised by its mean and std; the training side also augmented as the flags say."""
    rank, world, device = place.rank, place.world, place.device
    train_tf, val_tf = create_transforms(preprocess.augmentation, preprocess.resize, crop_fraction=preprocess.crop,
                                         **augment_options(args))
    if args.device_aug:
        train_tf = val_tf  # the device does the random part
    if args.cache:
        dataset.cache = DecodedCache.build(dataset.paths, val_tf, args.cache_dir, args.num_workers,
                                           regions=dataset.regions)
    train_set, val_set = dataset.split_dataset(train_tf, val_tf)
    if len(train_set) == 0 or (len(val_set) == 0 and has_validation(args)):
        raise FlagError(f"the split left {len(train_set)} training and {len(val_set)} validation images: "
                        "use more people or another --val_ratio")
    generator = torch.Generator()
    sampler = None
    if args.sampler != "none":
        sampler = make_sampler(train_set.targets("class" if args.sampler == "class" else "age_label"), args.seed)
        generator = sampler.generator
    elif distributed():
        sampler = torch.utils.data.DistributedSampler(train_set, world, rank, shuffle=True, seed=args.seed)
    val_shard = Subset(val_set.dataset, val_set.indices[rank::world], val_tf)
    if args.cache_features:
        train_set = build_feature_set(model, train_set, val_tf, preprocess.mean, preprocess.std, args.cache_dir,
                                      device, resolve_channels_last(args.channels_last, model)[0],
                                      flip=args.augmentation == "CustomAugmentation")
    common = dict(num_workers=args.num_workers, collate_fn=fast_collate, pin_memory=device.type == "cuda",
                  worker_init_fn=seed_worker)
    train_loader = DataLoader(train_set, args.batch_size, shuffle=sampler is None, sampler=sampler, generator=generator,
                              drop_last=drop_last_batch(len(train_set), world, args.batch_size, args.compile), **common)
    val_loader = DataLoader(val_shard, args.valid_batch_size, shuffle=False, persistent_workers=args.num_workers > 0,
                            **common)  # training's workers restart each epoch: they are seeded from the epoch
    augment = DeviceAugment(generator=generator) if args.device_aug else None
    erase = RandomErasing(args.reprob, mode=args.remode, max_count=args.recount, device=device) if args.reprob else None
    normalise = (None, None) if args.cache_features else (preprocess.mean, preprocess.std)  # features: as they are
    return (PrefetchLoader(train_loader, *normalise, device, augment=augment, erase=erase), generator,
            PrefetchLoader(val_loader, preprocess.mean, preprocess.std, device), val_shard)


def drop_last_batch(n_images, world, batch_size, compiled) -> bool:
    """Whether to drop the last training batch: one of 1 image breaks batch norm, and under --compile one of
    another size recompiles. Each rank gets ceil(n / world) images (DistributedSampler pads)."""
    remainder = math.ceil(n_images / world) % batch_size
    return remainder == 1 or (compiled and remainder > 0)


def run_precision(args, model, device, world=1, resumed=None, features_shape=None) -> Precision:
    """The Precision the loop uses: --amp and --channels_last resolved for this model and device, with
    the one-line explanation the run header prints. On a CPU with native bf16, auto times training steps
    of the model in bf16 and fp32 and takes the faster (rank 0's choice for every rank); with
    --cache_features, steps of the layers after the frozen ones on features, what the loop runs. A run
    resumed (`resumed`: its saved config) on the same kind of device keeps the precision it was trained
    in: auto's timing could otherwise pick the other one mid-run. The timing is kept in --cache_dir per
    machine and workload: the same command later repeats its choice."""
    if resumed and resumed.get("device_type") == device.type and "amp_resolved" in resumed:
        amp, reason = resolve_amp(resumed["amp_resolved"], device)  # bf16 on a GPU without it becomes fp16
        channels_last = resumed["channels_last_resolved"]
        line = (f"amp {amp}, channels_last {'on' if channels_last else 'off'}: as the resumed run was trained"
                + ("" if reason == "asked for" else f" ({reason})"))
    else:
        timed, size = (FromFeatures(model), features_shape[2:]) if features_shape else (model, args.resize)
        amp, channels_last, line = resolve_precision(timed, args.amp, args.channels_last, device, size,
                                                   args.batch_size, agree=lambda choice: gather(choice, world)[0],
                                                   remember=Path(args.cache_dir) / AMP_TIMINGS)
    return Precision(device, amp, channels_last, line)


def evaluate(model, loader, val_shard, precision, world):
    """Predictions over the *whole* validation set, gathered from every rank, in image order:
    (indices, 18-class probabilities, class targets, the years head's ages or None)."""
    probs, targets, years = predict(model, loader, precision.amp, channels_last=precision.channels_last,
                                    with_years=True)
    years = None if years is None else years.numpy()
    parts = gather((val_shard.indices.tolist(), probs.numpy(), to_class_targets(targets).numpy(), years), world)
    indices = np.concatenate([p[0] for p in parts]).astype(int)
    order = np.argsort(indices)
    probs = np.concatenate([p[1] for p in parts])[order]
    targets = np.concatenate([p[2] for p in parts])[order]
    ages = [p[3] for p in parts if p[3] is not None]  # a rank with no validation images has none
    years = np.concatenate(ages)[order] if ages else None
    return indices[order], probs, targets, years


@dataclass(frozen=True)
class RunData:
    """The checked images of a run: the train table, the --extra_data table (or None), each with its images'
    crop squares as a `region` column with --face_crop, the unreadable images left out, and the faces found in
    the images kept (config.json's record and no_face.csv; None without --face_crop)."""
    table: pd.DataFrame
    extra_table: pd.DataFrame | None
    skipped: tuple
    faces: object


@dataclass(frozen=True)
class Placement:
    """Where a process trains: its rank among `world` processes and its device."""
    rank: int
    world: int
    device: torch.device


@dataclass(frozen=True)
class Run:
    """Everything one training run is made of, built once (`build_run`) before its first epoch."""
    dataset: object
    model: torch.nn.Module
    ema: ModelEmaV3 | None
    train_model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: object
    scaler: torch.amp.GradScaler
    criterion: torch.nn.Module
    train_loader: PrefetchLoader
    generator: torch.Generator
    val_loader: PrefetchLoader
    val_shard: Subset
    precision: Precision
    options: TrainOptions
    config: dict
    n_val: int

    @property
    def scored(self) -> torch.nn.Module:
        """The weights validation, best.pth and inference use: the moving average with --ema."""
        return self.ema.module if self.ema is not None else self.model


@dataclass
class Progress:
    """How far a run is: epochs done, the best validation F1, epochs since it, the log rows."""
    epoch: int = 0
    best_f1: float = -1.0
    since_best: int = 0
    log: list = field(default_factory=list)


def build_run(args, data, place, fold, run_dir) -> tuple:
    """(Run, Progress, lines for the header) of one model: dataset and split, model and loaders, precision,
    config.json, optimizer, schedule, scaler, EMA, criterion, and a resumed run's saved state."""
    seed_everything(args.seed)
    deterministic = set_deterministic(args.deterministic, place.device)
    dataset = DATASETS[args.dataset](table=data.table, val_ratio=args.val_ratio, seed=args.seed, n_folds=args.n_folds,
                                     fold=fold or 0, drop_ages=args.drop_ages, extra_table=data.extra_table,
                                     exact_age=args.age_soft > 0 or args.age_years > 0)
    model = build_model(pretrained=False if args.resume else pretrained_choice(args), **model_args(args))
    trainable, total = freeze(model, args.freeze)
    if args.cache_features and (unsupported := check_supported(model)):
        raise FlagError(unsupported)
    config = run_config(args, model, run_dir, fold)
    faces = data.faces
    if faces is not None:
        config.update(faces=face_record(faces))
    train_loader, generator, val_loader, val_shard = make_loaders(args, Preprocess.from_flags(config), dataset, model,
                                                                  place)
    state = load_checkpoint(run_dir / "last.pth", place.device) if args.resume else None
    precision = run_precision(args, model, place.device, place.world, resumed=state and state.get("config"),
                                  features_shape=train_loader.dataset.shape if args.cache_features else None)
    config.update(amp_resolved=precision.amp, channels_last_resolved=precision.channels_last,
                  device_type=place.device.type, skipped_images=len(data.skipped),
                  deterministic_resolved=deterministic)
    spec = RunSpec.from_flags(config)  # what every tool reads, in place of flag names
    config.update(spec=spec.to_json())
    if place.rank == 0:
        write_json(run_dir / "config.json", config)
        if faces is not None:
            write_no_face(run_dir / "no_face.csv", faces)
        if data.skipped:
            write_bad_images(data.skipped, run_dir / "skipped_images.csv")
    model.to(place.device, memory_format=torch.channels_last if precision.channels_last else torch.preserve_format)
    options = TrainOptions.from_flags(config)  # checked (spec.training is None where an old run's values fail)
    optimizer, scheduler = build_optimization(options, model, updates_per_epoch(train_loader, options))
    scaler = torch.amp.GradScaler(place.device.type, enabled=precision.amp == "fp16")
    ema = ModelEmaV3(model, decay=options.ema, use_warmup=True, warmup_power=3 / 4) if options.ema else None
    criterion = create_multi_head_loss(criterion_spec(args), heads_of(args.kind), key_values(args.head_weights, float),
                                       gamma=args.focal_gamma, smoothing=args.smoothing, age_soft=args.age_soft,
                                       age_bins=args.age_bins, age_years=args.age_years).to(place.device)
    progress = Progress()
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        restore_scaler(scaler, state.get("scaler"))
        if ema is not None:
            ema.module.load_state_dict(state["ema"])
        progress = Progress(state["epoch"], state["best_f1"], state["since_best"], state["log"])
        if scheduler is not None:  # a function of the epoch or update: this also allows more --epochs (the first
            scheduler.step(progress.epoch)  # update then takes the longer schedule's lr, not the saved one)
            scheduler.step_update(progress.epoch * updates_per_epoch(train_loader, options))
    train_model = wrapped_for_training(args, model, precision, place)
    n_val = sum(gather(len(val_shard), place.world))
    lines = [f"run {run_dir}: {len(train_loader.dataset)} train / {n_val} val images, {trainable:,} of {total:,} "
             f"parameters trainable, device {place.device}, {place.world} process(es)", precision.line]
    if faces is not None:
        lines.append(found_line(faces, run_dir / "no_face.csv"))
    run = Run(dataset, model, ema, train_model, optimizer, scheduler, scaler, criterion, train_loader, generator,
              val_loader, val_shard, precision, options, config, n_val)
    return run, progress, lines


def build_optimization(options, model, updates) -> tuple:
    """(optimizer, scheduler or None) from timm's factories, as `options` (TrainOptions) say; `updates`: optimizer
    steps per epoch."""
    optimizer = timm.optim.create_optimizer_v2(model, opt=options.optimizer, lr=options.lr,
                                               weight_decay=options.weight_decay, momentum=options.momentum,
                                               layer_decay=options.layer_decay)
    if options.scheduler == "none":  # timm's schedulers apply --layer_decay's per-group lr_scale; without one, here
        for group in optimizer.param_groups:
            group["lr"] *= group.get("lr_scale", 1.0)
        return optimizer, None
    scheduler, _ = timm.scheduler.create_scheduler_v2(
        optimizer, sched=options.scheduler, num_epochs=options.epochs, decay_epochs=options.lr_decay_step,
        decay_rate=options.lr_gamma, warmup_epochs=options.warmup_epochs, warmup_lr=options.lr * 0.01,
        min_lr=options.lr * 0.01, step_on_epochs=not options.sched_on_updates, updates_per_epoch=updates)
    return optimizer, scheduler


def wrapped_for_training(args, model, precision, place) -> torch.nn.Module:
    """The module the loop steps: fed features with --cache_features, in DDP under torchrun, compiled with
    --compile (after DDP, as timm does: the graph is split at DDP's buckets so communication overlaps)."""
    train_model = FromFeatures(model) if args.cache_features else model  # the same modules, fed features
    if distributed():
        device = place.device
        train_model = DistributedDataParallel(train_model, device_ids=[device.index] if device.type == "cuda" else None)
    if args.compile:
        compiled, fallback = checked_compile(model, (args.batch_size, 3, *args.resize), place.device, precision.amp,
                                             precision.channels_last)
        if fallback and place.rank == 0:
            print(f"warning: --compile: {fallback}", file=sys.stderr)
        if not fallback:  # the check compiled the unwrapped model; under DDP the wrapper is compiled instead
            train_model = torch.compile(train_model) if distributed() else compiled
    return train_model


class Checkpoints:
    """The run folder's checkpoint files, as timm's CheckpointSaver keeps them: last.pth (what --resume
    restores, all of it) every epoch; best.pth, its confusion matrix and val_probs.csv when validation F1
    improves (without validation, every epoch: the last is the best); with --checkpoint_hist K the K best
    epochs' scored weights (epochN.pth) and their average (avg.pth), kept in memory with their F1."""

    def __init__(self, run_dir, run, progress):
        self.run_dir, self.run, self.keep = Path(run_dir), run, run.options.checkpoint_hist
        self.saved_epoch = progress.epoch  # the epoch last.pth holds
        self.history = []  # (sort key, epoch, scored weights on the CPU) of the kept epochs, best first
        for path in self.run_dir.glob("epoch*.pth") if self.keep else ():  # a resumed run's, read once
            saved = load_checkpoint(path)
            if saved["epoch"] <= progress.epoch:  # one saved after last.pth (a kill between them) is redone
                self.history.append((self.rank_of(saved["f1"], saved["epoch"]), saved["epoch"], saved["model"]))
        self.history.sort(key=lambda item: item[0], reverse=True)

    @staticmethod
    def rank_of(f1, epoch) -> tuple:
        """Better first: by validation F1; without validation (F1 nan) the later epoch."""
        return (epoch if math.isnan(f1) else f1, epoch)

    def epoch_end(self, progress, row, improved, evaluation):
        """What rank 0 writes when an epoch ends: its line, log.csv, best.pth and its files where it improved,
        the history, last.pth."""
        scores = (f"val loss {row['val_loss']:.4f}  val F1 {row['val_f1']:.4f}  mask/gender/age acc "
                  f"{row['val_mask_acc']:.3f}/{row['val_gender_acc']:.3f}/{row['val_age_acc']:.3f}"
                  if self.run.n_val else "no validation (--val_ratio 0)")
        print(f"epoch {progress.epoch}/{self.run.options.epochs}: loss {row['train_loss']:.4f}  {scores}  "
              f"{row['images_per_second']:.0f} img/s" + ("  *best*" if improved and self.run.n_val else ""))
        write_csv(self.run_dir / "log.csv", pd.DataFrame(progress.log))
        if improved:
            self.save_best(progress, evaluation)
        if self.keep:
            self.save_history(row.get("val_f1", float("nan")), progress.epoch)
        self.save_last(progress)

    def save_last(self, progress):
        """last.pth. The schedule is a function of the epoch (and update) and every epoch reseeds its random
        state from --seed, so neither is saved: resume restores everything last.pth holds."""
        run = self.run
        save_checkpoint(self.run_dir / "last.pth", dict(
            model=run.model.state_dict(), ema=run.ema.module.state_dict() if run.ema else None,
            optimizer=run.optimizer.state_dict(), scaler=run.scaler.state_dict(), epoch=progress.epoch,
            best_f1=progress.best_f1, since_best=progress.since_best, log=progress.log, config=run.config))
        self.saved_epoch = progress.epoch

    def save_best(self, progress, evaluation):
        save_checkpoint(self.run_dir / "best.pth", dict(model=self.run.scored.state_dict(), epoch=progress.epoch,
                                                        f1=progress.best_f1, config=self.run.config))
        if evaluation is not None:
            indices, probs, targets, years = evaluation
            save_best_epoch_files(self.run_dir, self.run.dataset, indices, probs, targets, progress.epoch - 1, years)

    def save_history(self, f1, epoch):
        """epochN.pth of this epoch, the K best kept, and avg.pth their average (`inference.py --checkpoint
        avg`); batch-norm statistics are averaged with the weights, not recomputed."""
        weights = {key: value.detach().cpu().clone() for key, value in self.run.scored.state_dict().items()}
        config = self.run.config
        save_checkpoint(self.run_dir / f"epoch{epoch}.pth", dict(model=weights, epoch=epoch, f1=f1, config=config))
        self.history = [item for item in self.history if item[1] != epoch]
        self.history.append((self.rank_of(f1, epoch), epoch, weights))
        self.history.sort(key=lambda item: item[0], reverse=True)
        for _, dropped, _ in self.history[self.keep:]:
            (self.run_dir / f"epoch{dropped}.pth").unlink(missing_ok=True)
        self.history = self.history[:self.keep]
        states = [state for _, _, state in self.history]
        average = {key: torch.stack([s[key].float() for s in states]).mean(0).to(value.dtype)
                   if value.is_floating_point() else value for key, value in states[0].items()}
        save_checkpoint(self.run_dir / "avg.pth", dict(model=average, epoch=epoch, f1=f1, config=config,
                                                       averaged_epochs=sorted(e for _, e, _ in self.history)))


def train_run(args, data, place, fold, run_dir, on_epoch=None, header="") -> float:
    """Train one model into `run_dir`; return its best validation macro F1. `data`: the checked images
    (RunData); `place`: rank, world and device; `header`: the run header's first line; `on_epoch(epoch,
    row, fold)`: a tool's hook after every saved epoch."""
    run, progress, lines = build_run(args, data, place, fold, run_dir)
    options, is_main = run.options, place.rank == 0
    checkpoints = Checkpoints(run_dir, run, progress)
    if is_main:
        if args.resume:
            remove_stale_temporaries(run_dir)
        else:  # from here on the run folder can always be resumed, even after a kill
            checkpoints.save_last(progress)
        print("\n".join(([header] if header else []) + lines), flush=True)
        if args.resume:
            print(f"resumed at epoch {progress.epoch + 1} (best F1 so far {progress.best_f1:.4f})")
    wandb_run = start_wandb(args, run.config, run_dir) if args.wandb and is_main else None
    try:
        while progress.epoch < options.epochs:
            row, evaluation = train_and_validate(run, place, progress.epoch)
            progress.epoch += 1
            progress.log.append(row)
            improved = not run.n_val or row["val_f1"] > progress.best_f1  # without validation: the last is best
            progress.best_f1, progress.since_best = ((row.get("val_f1", float("nan")), 0) if improved
                                                     else (progress.best_f1, progress.since_best + 1))
            if is_main:
                checkpoints.epoch_end(progress, row, improved, evaluation)
                if wandb_run is not None:
                    wandb_run.log(row, step=progress.epoch)
                if on_epoch is not None:
                    on_epoch(progress.epoch, row, fold)
            if options.early_stop and progress.since_best >= options.early_stop:
                if is_main:
                    print(f"early stop: no better F1 for {progress.since_best} epochs")
                break
    except KeyboardInterrupt:  # last.pth keeps the last saved epoch: a part of an epoch cannot be resumed
        done = checkpoints.saved_epoch
        finished = f"the end of epoch {done}" if done else "the run before its first epoch"
        raise RunInterrupted(f"interrupted: {run_dir / 'last.pth'} holds {finished}; continue with --resume "
                             f"{run_dir}") from None
    finally:
        if wandb_run is not None:
            wandb_run.finish()
    if is_main:
        finish_run(options, run_dir, progress.best_f1, run.n_val)
    return progress.best_f1


def train_and_validate(run, place, epoch) -> tuple:
    """One epoch of training and, with validation, its scores: (the log row, (indices, probabilities, targets,
    years) or None). Every rank seeds its own augmentation from --seed, the epoch and its rank (as timm)."""
    seed = run.options.seed + epoch * place.world + place.rank
    seed_everything(seed)
    run.generator.manual_seed(seed)
    if isinstance(run.train_loader.sampler, torch.utils.data.DistributedSampler):
        run.train_loader.sampler.set_epoch(epoch)
    row = train_epoch(run, epoch, place.rank == 0)
    if run.scheduler is not None:
        run.scheduler.step(epoch + 1)
    if distributed():  # validate with batch-norm statistics averaged over the ranks (timm's distribute_bn)
        distribute_bn(run.model, place.world, reduce=True)
        if run.ema is not None:
            distribute_bn(run.ema.module, place.world, reduce=True)
    if not run.n_val:
        return row, None
    indices, probs, targets, years = evaluate(run.scored, run.val_loader, run.val_shard, run.precision, place.world)
    row.update(val_loss=val_loss(probs, targets), **{f"val_{k}": v for k, v in score(targets, probs).items()})
    if years is not None:
        row["val_years_mae"] = float(np.abs(years - run.dataset.table["age"].to_numpy()[indices]).mean())
    return row, (indices, probs, targets, years)


def finish_run(options, run_dir, best_f1, n_val):
    """The run's last line, last.pth dropped with --keep_last off, and report.html (never costing the run)."""
    if options.keep_last == "off":
        (run_dir / "last.pth").unlink(missing_ok=True)
    print(f"best validation macro F1 {best_f1:.4f}; run folder {run_dir}" if n_val else
          f"trained on every image for {options.epochs} epochs (best.pth is the last epoch); run folder {run_dir}")
    if options.report == "on":
        try:
            print(f"report: {write_report(run_dir, cams=False)} (python report.py {run_dir} adds where the heads "
                  "look)")
        except Exception as error:  # a report must never cost the run
            print(f"warning: no report.html ({one_line(error)})", file=sys.stderr)


def restore_scaler(scaler, saved) -> None:
    """A resumed run's grad scaler state, where both sides are fp16's: a run trained on a CPU (its disabled
    scaler saved {}) resumed on a V100 (fp16: an enabled scaler) starts a fresh scale instead of failing."""
    if scaler.is_enabled() and saved:
        scaler.load_state_dict(saved)


def head_lr(optimizer) -> float:
    """The learning rate of the heads: the largest of the groups (with --layer_decay the backbone's are lower)."""
    return max(group["lr"] for group in optimizer.param_groups)


def updates_per_epoch(loader, options) -> int:
    """Optimizer steps in one pass over `loader` (the last partial --grad_accum group counts as one)."""
    return math.ceil(len(loader) / options.grad_accum)


def clip_gradients(model, optimizer, scaler, value, mode="norm"):
    """timm's gradient clipping (norm, value or agc) of the trainable parameters, on the true gradients:
    a fp16 grad scaler unscales them first (its step then does not unscale again)."""
    scaler.unscale_(optimizer)
    dispatch_clip_grad([p for p in model.parameters() if p.grad is not None], value, mode=mode)


def train_epoch(run, epoch, is_main) -> dict:
    """One pass over the training data of `run` (a Run: its train_model, loader, criterion, optimizer,
    scaler, precision, EMA, scheduler and options); returns the epoch's log row (train losses, lr, speed). The EMA
    follows the unwrapped model after every optimizer step; a timm scheduler made with
    step_on_epochs=False moves the learning rate then too."""
    loader, optimizer, options = run.train_loader, run.optimizer, run.options
    updates_before = epoch * updates_per_epoch(loader, options)
    run.train_model.train()
    sums, seen, started = {}, 0, time.time()
    optimizer.zero_grad(set_to_none=True)
    bar = tqdm(loader, desc=f"epoch {epoch + 1}/{options.epochs}", disable=not is_main, leave=False, dynamic_ncols=True)
    for step, (images, targets) in enumerate(bar):
        updating = (step + 1) % options.grad_accum == 0 or step + 1 == len(loader)
        total, parts = forward_backward(run, images, targets, updating)
        if updating:
            optimizer_update(run, updates_before + step // options.grad_accum + 1)
        for key, value in [("train_loss", total)] + [(f"train_loss_{h}", v) for h, v in parts.items()]:
            sums[key] = sums.get(key, 0.0) + value.detach() * len(images)
        seen += len(images)
        if (step + 1) % options.log_interval == 0 or step + 1 == len(loader):
            loss = sums["train_loss"].item() / seen
            if not math.isfinite(loss):
                raise FloatingPointError(f"training loss became {loss} at epoch {epoch + 1}, step {step + 1}: "
                                         "lower --lr, or use --amp bf16 / off")
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{head_lr(optimizer):.2e}",
                            img_s=f"{seen / (time.time() - started):.0f}")
    seconds = time.time() - started
    return {"epoch": epoch + 1, **{k: v.item() / max(seen, 1) for k, v in sums.items()}, "lr": head_lr(optimizer),
            "epoch_seconds": seconds, "images_per_second": seen / max(seconds, 1e-9)}


def forward_backward(run, images, targets, updating) -> tuple:
    """The loss of one batch (MixUp / CutMix on some, as --mix_prob draws) and its backward pass: (total,
    per-head losses). Under DDP a micro-batch that ends no update runs inside no_sync: one all-reduce per
    optimizer step, not per batch."""
    model, precision, options = run.train_model, run.precision, run.options
    if precision.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    mixing = (options.mixup > 0 or options.cutmix > 0) and random.random() < options.mix_prob
    if mixing:
        images, permutation, lam = mix_batch(images, options.mixup, options.cutmix)
    syncing = nullcontext() if updating or not hasattr(model, "no_sync") else model.no_sync()
    with syncing:  # forward and backward both inside no_sync, as DDP needs
        with autocast(precision.device, precision.amp):
            outputs = model(images)
            total, parts = run.criterion(outputs, targets)
            if mixing:
                total_b, parts_b = run.criterion(outputs, targets[permutation])
                total = lam * total + (1 - lam) * total_b
                parts = {head: lam * parts[head] + (1 - lam) * parts_b[head] for head in parts}
        run.scaler.scale(total / options.grad_accum).backward()
    return total, parts


def optimizer_update(run, updates):
    """The optimizer step after the accumulated batches (gradients clipped first), then the EMA and a
    per-update schedule; `updates`: optimizer steps since the run began."""
    options = run.options
    if options.clip_grad is not None:
        clip_gradients(run.train_model, run.optimizer, run.scaler, options.clip_grad, options.clip_mode)
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.optimizer.zero_grad(set_to_none=True)
    if run.ema is not None:
        run.ema.update(run.model, step=updates)
    if run.scheduler is not None:
        run.scheduler.step_update(updates)  # a no-op for a schedule that moves per epoch


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


def starting_weight_lines(args) -> dict:
    """{backbone name: where its starting weights come from} (config.json and the report; nothing fetched)."""
    names = dict.fromkeys([args.model, *key_values(args.backbones).values()])
    return {name: weights_line(name, pretrained_choice(args)) for name in names}


def starting_weights(args) -> dict:
    """starting_weight_lines, with timm's pretrained weights fetched into timm's cache now, before any work
    (--pretrained auto or timm on a timm name); a one-line error where they cannot be had."""
    lines = starting_weight_lines(args)
    for name in lines:
        if pretrained_choice(args) is True and not is_source(name):
            fetch_pretrained(name)
    return lines


def check_wandb_login():
    """--wandb online needs a logged-in wandb: one line before any work instead of wandb's traceback."""
    import wandb
    try:
        logged_in = wandb.login(prompt=False, verify=False)
    except Exception:  # wandb's own errors (a bad key file, ...) mean the same for the user
        logged_in = False
    if not logged_in:
        raise FlagError("--wandb: not logged in to Weights & Biases: run `wandb login` (or set WANDB_API_KEY), or "
                        "pass --wandb_mode offline (sync later with `wandb sync`)")


def run_header(args, weights, resumed_note="") -> str:
    """The run header's first line: model, where its weights come from, input size, epochs, batch size, lr."""
    if weights is None:
        source = "from the resumed run's last.pth"
    else:
        source = "; ".join(f"{name}: {line}" if len(weights) > 1 else line for name, line in weights.items())
    line = (f"model {args.model} ({args.kind}), weights {source}; input {args.resize[0]}x{args.resize[1]}, "
            f"epochs {args.epochs}, batch {args.batch_size}, lr {args.lr:g} ({args.optimizer}, {args.scheduler})")
    return line + (f"; changed on resume: {resumed_note}" if resumed_note else "")


def remove_unfinished(run_dirs):
    """Delete the run folders of a failed run that never saved a best checkpoint (nothing to lose)."""
    for run_dir in run_dirs:
        if run_dir.is_dir() and not (run_dir / "best.pth").is_file():
            shutil.rmtree(run_dir, ignore_errors=True)


# ---------------------------------------------------------------- main
def main(argv=None, on_epoch=None) -> list:
    """Run train.py with `argv`; return the best validation macro F1 of each fold. `on_epoch(epoch,
    log_row, fold)` (the hook of tools such as search.py) is called after every saved epoch; an
    exception it raises stops the run, its checkpoints kept."""
    args = parse_args(argv)
    resumed_note = ""
    if args.resume:
        args, run_dir, saved, resumed_note = resumed_args(args, given_flags(argv))
    try:
        validate(args)
    except FlagError as error:
        raise SystemExit(f"error: {error}") from None
    try:
        rank, world, device = setup_distributed(args.device)
    except DeviceError as error:
        raise SystemExit(f"error: {error}") from None
    report_data_once(rank)
    run_dirs, base = [], args.name
    try:
        with one_line_errors(FlagError, FloatingPointError):
            check_one_process(args)
            weights = None if args.resume else starting_weights(args)
            if args.wandb and args.wandb_mode == "online":  # every rank: none may wait for a rank 0 that stopped
                check_wandb_login()
            try:
                table = scan_people(args.data_dir, tuple(args.age_bins), args.relabel, check_images=False)
                extra_tables = [scan_people(d, tuple(args.age_bins), check_images=False, expect_complete=False)
                                for d in args.extra_data]
                extra_table = pd.concat(extra_tables, ignore_index=True) if extra_tables else None
                table, extra_table, faces = find_run_faces(args, table, extra_table)
                table, extra_table, skipped = check_data(args, table, extra_table)
                folds = [args.fold] if args.fold is not None else list(range(args.n_folds)) if args.n_folds else [None]
                if args.resume:
                    folds, run_dirs = [saved["fold"]], [run_dir]
                else:
                    suffixes = [f"_fold{k}" for k in folds] if folds != [None] else [""]
                    base = new_run_dir(args.model_dir, args.name, suffixes) if rank == 0 else None
                    base = gather(base, world)[0]
                    run_dirs = [Path(args.model_dir) / f"{base}{s}" for s in suffixes]
                header = run_header(args, weights, resumed_note)
                if faces is not None:  # the images the run keeps
                    faces = faces.subset(pd.concat([t["path"] for t in (table, extra_table) if t is not None]))
                data = RunData(table, extra_table, tuple(skipped), faces)
                place = Placement(rank, world, device)
                scores = [train_run(args, data, place, fold, run_dir, on_epoch, header)
                          for fold, run_dir in zip(folds, run_dirs, strict=True)]
            except (Exception, KeyboardInterrupt) as error:
                if rank == 0 and not args.resume and not isinstance(error, RunInterrupted):
                    remove_unfinished(run_dirs)
                raise
    finally:
        if distributed():
            dist.destroy_process_group()
    if len(scores) > 1 and rank == 0:
        summary = dict(folds=[str(d) for d in run_dirs], f1=scores, mean=float(np.mean(scores)),
                       std=float(np.std(scores)))
        summary_path = Path(args.model_dir) / f"{base}_cv.json"
        write_json(summary_path, summary)
        print(f"{len(scores)} folds: macro F1 {summary['mean']:.4f} +- {summary['std']:.4f}; the folds are listed "
              f"in {summary_path}; vote them with: python ensemble.py {summary_path} --data_dir EVAL_DIR")
    return scores


if __name__ == "__main__":
    run_command(main)

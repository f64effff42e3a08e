"""train.py's flags: the parser (a --config YAML or JSON file sets any of them), which flags a command line
gave, a resumed run's own flags (`resumed_args`), and the check of every value before any work starts
(`validate`, one-line `FlagError`s)."""
import argparse
import os
from pathlib import Path

import timm
import timm.optim

from augment import AUGMENTATIONS, AUTO_AUGMENTS, check_augment_options
from cache import DEFAULT_CACHE_DIR
from dataset import DATASETS, SAMPLE_DIR, check_fold
from faces import DEFAULT_DETECTOR, DEFAULT_MARGIN, DEFAULT_SCORE, MARGIN_RANGE, check_face_settings
from labels import HEADS, heads_of
from loss import create_criterion
from model import MODEL_KINDS, check_freeze, check_model_name
from precision import AMP_CHOICES, CHANNELS_LAST_CHOICES, DEVICE_CHOICES
from runs import one_line, read_config, tool_parser
from spec import TrainOptions

RESUME_OVERRIDES = {"epochs", "num_workers", "log_interval", "early_stop", "device", "keep_last", "report"}
TRAIN_DOC = """Train a mask / gender / age classifier: a run folder with config.json, best.pth, last.pth, log.csv and
report.html. Every flag can also be set in a --config YAML or JSON file.

examples:
  python train.py --pretrained none                        # the bundled sample, offline, random weights
  python train.py --data_dir /data/train --model convnext_tiny --resize 224 224 --face_crop --epochs 10
  torchrun --nproc_per_node=2 train.py --data_dir /data/train   # DistributedDataParallel, same flags"""


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
    parser = tool_parser(TRAIN_DOC)
    parser.add_argument("--config", help="YAML or JSON file setting any flag; command-line flags override it")
    data = parser.add_argument_group("data")
    data.add_argument("--data_dir", default=os.environ.get("SM_CHANNEL_TRAIN", str(SAMPLE_DIR / "train")),
                      help="train folder (images/ + train.csv) or its images/ folder")
    data.add_argument("--dataset", default="MultiLabelDataset", choices=list(DATASETS),
                      help="MultiLabelDataset: targets per head (mask, gender, age); MaskBaseDataset / "
                           "MaskSplitByProfileDataset: the baseline's (random split by image / split by person)")
    data.add_argument("--augmentation", default="CustomAugmentation", choices=list(AUGMENTATIONS),
                      help="the per-image preparation and training augmentation (BaseAugmentation: resize only)")
    data.add_argument("--resize", type=int, nargs=2, default=[128, 96], metavar=("H", "W"),
                      help="the model's input size")
    data.add_argument("--crop", type=float, nargs=2, default=None, metavar=("H_FRAC", "W_FRAC"),
                      help="centre crop as fractions of the input before resizing (default: the augmentation's; 1 1: "
                           "none)")
    data.add_argument("--val_ratio", type=float, default=0.2,
                      help="share of people held out for validation; 0: train on everyone for --epochs "
                           "(best.pth is the last epoch, no val_probs.csv)")
    data.add_argument("--n_folds", type=int, default=0, help="K-fold over people (0: a single split)")
    data.add_argument("--fold", type=int, default=None, help="train only this fold (default: all folds)")
    data.add_argument("--sampler", default="none", choices=["none", "class", "age"],
                      help="class-balanced sampling of the 18 classes or of the age groups")
    data.add_argument("--age_bins", type=int, nargs=2, default=[30, 60], metavar=("MIDDLE", "OLD"),
                      help="the first age of the middle and of the old group")
    data.add_argument("--drop_ages", type=int, nargs="*", default=[], help="ages left out of training, e.g. 57 58 59")
    data.add_argument("--relabel", default=None, help="CSV of label corrections (see docs/training.md; default: none)")
    data.add_argument("--extra_data", nargs="*", default=[], metavar="DIR",
                      help="more train-layout folders (e.g. from synthesize.py) added to training only; "
                      "their people may have fewer than 7 images")
    data.add_argument("--skip_bad_images", action="store_true",
                      help="leave unreadable images out (with a warning) instead of stopping before the run")
    data.add_argument("--num_workers", type=int, default=min(4, os.cpu_count() or 1),
                      help="data loader processes (0: load in the training process)")
    data.add_argument("--cache", action="store_true",
                      help="decode, crop and resize every image once into a cache file, reused by later epochs "
                           "and runs")
    data.add_argument("--cache_dir", default=DEFAULT_CACHE_DIR,
                      help="the decoded cache and the record of images already checked")
    data.add_argument("--cache_features", action="store_true",
                      help="with --freeze N: compute the frozen stages' output for every image and its mirror "
                           "image once (kept in --cache_dir for later runs) and train the rest on it; flip is "
                           "then the only augmentation (EfficientNet backbones; see features.py)")
    faces = parser.add_argument_group("face crop (photos where the face is not framed: faces.py)")
    faces.add_argument("--face_crop", action="store_true",
                       help="crop a square around each image's face, found once by a detector (cached in "
                            "--cache_dir); images without a face get the typical face square of the images where "
                            "one was found (listed in no_face.csv)")
    faces.add_argument("--face_detector", default=DEFAULT_DETECTOR,
                       help="YuNet's ONNX file (the project's weights/ folder ships OpenCV's model zoo file)")
    faces.add_argument("--face_margin", type=float, default=DEFAULT_MARGIN,
                       help=f"the crop's side over the face box's larger side, {MARGIN_RANGE[0]} to {MARGIN_RANGE[1]}")
    faces.add_argument("--face_score", type=float, default=DEFAULT_SCORE, help="the detector's score threshold")
    augment = parser.add_argument_group("training augmentation (never applied to validation or inference)")
    augment.add_argument("--color_jitter", type=float, default=0.0, metavar="S",
                         help="brightness, contrast and saturation factors drawn in 1 +- S")
    augment.add_argument("--grayscale", type=float, default=0.0, metavar="P", help="probability of grayscale")
    augment.add_argument("--sharpness", type=float, default=0.0, metavar="S",
                         help="sharpness factor 1 + S, half the images")
    augment.add_argument("--noise", type=float, default=0.0, metavar="SIGMA",
                         help="gaussian noise, sigma as a fraction of the 0..255 range")
    augment.add_argument("--auto_augment", default="none", choices=list(AUTO_AUGMENTS),
                         help="torchvision's AutoAugment (ImageNet policy) or TrivialAugmentWide on the uint8 image")
    augment.add_argument("--reprob", type=float, default=0.0, metavar="P",
                         help="random erasing probability (timm's RandomErasing, on the normalised batch)")
    augment.add_argument("--remode", default="pixel", choices=["const", "rand", "pixel"],
                         help="random erasing fill: const (the mean), rand (a colour per box), pixel (noise)")
    augment.add_argument("--recount", type=int, default=1, help="random erasing: at most this many boxes")
    augment.add_argument("--randaugment", type=int, nargs=2, default=None, metavar=("N", "M"),
                         help="torchvision RandAugment: N operations of magnitude M (0..30) (default: off)")
    augment.add_argument("--mixup", type=float, default=0.0, metavar="ALPHA", help="batch MixUp (Beta alpha; 0: off)")
    augment.add_argument("--cutmix", type=float, default=0.0, metavar="ALPHA",
                         help="batch CutMix (Beta alpha; 0: off)")
    augment.add_argument("--mix_prob", type=float, default=0.5, help="share of batches mixed when --mixup/--cutmix")
    augment.add_argument("--device_aug", action="store_true",
                         help="flip, crop and colour batch-wise on the device (GPU) instead of per image on the CPU")
    model = parser.add_argument_group("model")
    model.add_argument("--kind", default="three_head", choices=list(MODEL_KINDS),
                       help="three_head: mask, gender and age heads on one backbone; single_head: one 18-class head; "
                            "multi_backbone: a backbone per head (--backbones)")
    model.add_argument("--model", default="resnet18",
                       help="a timm backbone name, or a timm model source: local-dir:FOLDER, hf-hub:ORG/NAME")
    model.add_argument("--backbones", nargs="*", default=[], metavar="HEAD=NAME",
                       help="with --kind multi_backbone: a backbone per head, e.g. mask=convnext_tiny "
                            "age=swin_s3_tiny_224 (heads left out use --model)")
    model.add_argument("--pretrained", default="auto",
                       help="auto: pretrained weights (a timm name's from timm, downloaded once into its cache; a "
                            "model source's own); none: random weights; timm: as auto; or a .pth/.safetensors file")
    model.add_argument("--freeze", default="none", help="none, all (train heads only) or N (train the last N stages)")
    model.add_argument("--drop_rate", type=float, default=0.0, help="dropout before each head")
    model.add_argument("--drop_path_rate", type=float, default=0.0, help="stochastic depth of the backbone (timm's)")
    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--epochs", type=int, default=10, help="passes over the training images")
    optim.add_argument("--clip_grad", type=float, default=None, metavar="V",
                       help="clip gradients (timm's dispatch_clip_grad; after unscaling under fp16; default: off)")
    optim.add_argument("--clip_mode", default="norm", choices=["norm", "value", "agc"],
                       help="--clip_grad clips the total norm, each value, or adaptively (agc)")
    optim.add_argument("--batch_size", type=int, default=64, help="training images per batch (per process)")
    optim.add_argument("--valid_batch_size", type=int, default=256, help="validation images per batch")
    optim.add_argument("--optimizer", default="adamw", help="any of timm's optimizers: sgd, adam, adamw, lion, ...")
    optim.add_argument("--lr", type=float, default=1e-3, help="learning rate (of the heads with --layer_decay)")
    optim.add_argument("--weight_decay", type=float, default=0.01, help="the optimizer's weight decay")
    optim.add_argument("--momentum", type=float, default=0.9, help="sgd's momentum")
    optim.add_argument("--scheduler", default="cosine", choices=["cosine", "step", "none"],
                       help="learning-rate schedule (timm's), to 1%% of --lr at the end for cosine")
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
    losses.add_argument("--head_weights", nargs="*", default=[], metavar="HEAD=W",
                        help="loss weight per head, e.g. age=1.5 (heads left out: 1)")
    losses.add_argument("--focal_gamma", type=float, default=2.0, help="focal loss: the focusing exponent")
    losses.add_argument("--smoothing", type=float, default=0.1, help="label_smoothing: the share spread over classes")
    losses.add_argument("--age_soft", type=float, default=0.0, metavar="SIGMA",
                        help="age head: soft targets from the exact age, a Gaussian of SIGMA years over the groups "
                             "(0: hard groups); needs MultiLabelDataset and a model with heads")
    losses.add_argument("--age_years", type=float, default=0.0, metavar="W",
                        help="add an exact-age regression head (years) beside the three heads, its mean absolute "
                             "error in tens of years weighted W (0: off); val_probs.csv gets its ages (age_years) "
                             "for audit.py; needs MultiLabelDataset and --kind three_head")
    run = parser.add_argument_group("run")
    run.add_argument("--device", default="auto", choices=DEVICE_CHOICES,
                     help="auto: the GPU where this torch can use it, else the CPU; cuda: the GPU or a one-line "
                          "error saying why not")
    run.add_argument("--deterministic", default="auto", choices=["auto", "on", "off"],
                     help="deterministic kernels (torch.use_deterministic_algorithms): auto is on for CPUs, off "
                          "for GPUs")
    run.add_argument("--checkpoint_hist", type=int, default=0, metavar="K",
                     help="keep the K best epochs' weights (epochN.pth) and their average as avg.pth (0: off)")
    run.add_argument("--keep_last", default="on", choices=["on", "off"],
                     help="off: delete last.pth (weights, optimizer state: what --resume needs) when the run "
                          "finishes, keeping best.pth; about 3x the model's size saved per run")
    run.add_argument("--model_dir", default=os.environ.get("SM_MODEL_DIR", "./model"),
                     help="where run folders are made")
    run.add_argument("--name", default="exp", help="run folder name (exp, exp2, ... never overwrites)")
    run.add_argument("--seed", type=int, default=42, help="the seed of the split, the weights and the augmentation")
    run.add_argument("--resume", default=None, help="a run folder (or its last.pth) to continue with its own "
                     "settings; only " + ", ".join("--" + f for f in sorted(RESUME_OVERRIDES)) + " may change")
    run.add_argument("--log_interval", type=int, default=20, help="batches between loss checks")
    logging = parser.add_argument_group("logging")
    logging.add_argument("--wandb", action="store_true", help="log to Weights & Biases (`wandb login` first)")
    logging.add_argument("--wandb_project", default="masktrain", help="the wandb project")
    logging.add_argument("--wandb_entity", default=None, help="the wandb team or user (default: yours)")
    logging.add_argument("--wandb_name", default=None, help="the wandb run name (default: the run folder name)")
    logging.add_argument("--wandb_mode", default="online", choices=["online", "offline"],
                         help="offline: log into the run folder without a login, `wandb sync` later")
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


def given_flags(argv=None) -> set:
    """The flags set on the command line (not by defaults)."""
    parser = build_parser()
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    return set(vars(parser.parse_known_args(argv)[0]))


def augment_options(args) -> dict:
    """The optional training augmentations set by flags."""
    return dict(color_jitter=args.color_jitter, grayscale=args.grayscale, sharpness=args.sharpness, noise=args.noise,
                randaugment=args.randaugment, auto_augment=args.auto_augment)


def has_validation(args) -> bool:
    """Whether the run holds people out (k-fold, or --val_ratio > 0); --val_ratio 0 trains on everyone."""
    return bool(args.n_folds) or args.val_ratio > 0


def validate(args):
    """Check every flag value before any work; raise FlagError with one line."""
    if not Path(args.data_dir).is_dir():
        raise FlagError(f"--data_dir not found: {args.data_dir}")
    for flag, name in [("--model", args.model)] + [("--backbones", n) for n in key_values(args.backbones).values()]:
        try:
            check_model_name(name)
        except (ValueError, OSError, RuntimeError) as error:
            raise FlagError(f"{flag}: {error}") from None
    if args.backbones and args.kind != "multi_backbone":
        raise FlagError(f"--backbones needs --kind multi_backbone (got --kind {args.kind}, which uses --model alone)")
    unknown_heads = set(key_values(args.backbones)) - set(HEADS)
    if unknown_heads:
        raise FlagError(f"--backbones: unknown heads {sorted(unknown_heads)}; heads are mask, gender, age")
    if args.optimizer.lower() not in timm.optim.list_optimizers() and args.optimizer.lower() != "sgd":
        raise FlagError(f"--optimizer: unknown optimizer {args.optimizer!r} (timm's: sgd, adam, adamw, lion, ...)")
    if not 0 <= args.reprob <= 1 or args.recount < 1:
        raise FlagError(f"--reprob must be a probability in [0, 1] and --recount at least 1, got {args.reprob} and "
                        f"{args.recount}")
    if args.crop is not None and not all(0 < f <= 1 for f in args.crop):
        raise FlagError(f"--crop fractions must be in (0, 1], got {args.crop}")
    if min(args.resize) <= 0:
        raise FlagError(f"--resize must be positive, got {args.resize}")
    if not 0 <= args.val_ratio < 1 and not args.n_folds:
        raise FlagError(f"--val_ratio must be in [0, 1), got {args.val_ratio}")
    if not has_validation(args) and args.early_stop:
        raise FlagError("--early_stop needs validation: drop it or use --val_ratio > 0")
    if args.valid_batch_size <= 0 or args.num_workers < 0:
        raise FlagError(f"--valid_batch_size must be positive and --num_workers >= 0, got {args.valid_batch_size} "
                        f"and {args.num_workers}")
    for folder in args.extra_data:
        if not Path(folder).is_dir():
            raise FlagError(f"--extra_data folder not found: {folder}")
    if args.relabel and not Path(args.relabel).is_file():
        raise FlagError(f"--relabel file not found: {args.relabel}")
    if args.pretrained not in ("auto", "none", "timm") and not Path(args.pretrained).is_file():
        raise FlagError(f"--pretrained: weights file not found: {args.pretrained}")
    criteria = criterion_spec(args)
    try:
        for head, n in heads_of(args.kind).items():
            name = criteria.get(head, "cross_entropy") if isinstance(criteria, dict) else criteria
            create_criterion(name, n)
        check_freeze(args.freeze)
        check_fold(args.n_folds, args.fold)
        TrainOptions.from_flags(vars(args))
        check_face_settings(args.face_margin, args.face_score, args.face_detector if args.face_crop else None)
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
                                    ("--auto_augment", args.auto_augment != "none"), ("--reprob", args.reprob),
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


def resumed_args(args, given) -> tuple:
    """(the resumed run's own flags with the RESUME_OVERRIDES given now, its folder, its saved config, the
    header's note on what changed) for --resume. Other flags given with different values are refused in
    one line: the run keeps the settings it was trained with."""
    resume = Path(args.resume)
    run_dir = resume if resume.is_dir() else resume.parent
    if not resume.exists():
        raise SystemExit(f"error: --resume: {resume} not found (a run folder under --model_dir, e.g. model/exp)")
    if resume.is_file() and resume.name != "last.pth":
        raise SystemExit(f"error: --resume: {resume} is not a run's last.pth (only last.pth holds the optimizer "
                         f"state a run continues from): pass its run folder, --resume {run_dir}")
    if not (run_dir / "last.pth").is_file():
        raise SystemExit(f"error: --resume: {run_dir} has no last.pth: is it a train.py run folder? (runs finished "
                         "with --keep_last off cannot be resumed)")
    try:
        saved = read_config(run_dir, "last")
    except (OSError, ValueError) as error:
        raise SystemExit(f"error: --resume: {one_line(error)}") from None
    changed = sorted(flag for flag in given - RESUME_OVERRIDES - {"resume", "config"}
                     if flag in saved and saved[flag] != getattr(args, flag))
    if changed:
        raise SystemExit("error: --resume continues a run with its own settings; these cannot change: "
                         + ", ".join(f"--{flag} (run: {saved[flag]})" for flag in changed)
                         + f"; only {', '.join('--' + f for f in sorted(RESUME_OVERRIDES))} may (or start a new run)")
    overrides = {flag for flag in given & RESUME_OVERRIDES if saved.get(flag) != getattr(args, flag)}
    keep = {flag: getattr(args, flag) for flag in overrides | {"resume"}}
    args = argparse.Namespace(**{**vars(args), **{k: v for k, v in saved.items() if hasattr(args, k)}, **keep})
    note = ", ".join(f"--{flag} {saved.get(flag)} -> {getattr(args, flag)}" for flag in sorted(overrides))
    return args, run_dir, saved, note

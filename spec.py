"""A run's spec: what a finished run folder says about how its model was made and how it sees an image, as
frozen records. train.py writes it into config.json (`"spec"`, with SPEC_VERSION) from its validated flags;
inference, ensembling, the audit and the report read it with `RunSpec.of(config)` instead of train.py's
flag names, so a renamed flag does not break a saved run. A config.json written before the spec existed is
converted from that version's flags, in `from_flags` alone."""
from dataclasses import asdict, dataclass, fields

SPEC_VERSION = 3  # 3: the training options, starting weights and precision


@dataclass(frozen=True)
class FaceCropSpec:
    """How a --face_crop run found and cropped faces: the detector file, its score threshold, the crop's
    side over the face box's, and where an image without a face is cropped (the run's typical face square,
    or None: the centre crop)."""
    detector: str
    score: float
    margin: float
    fallback: tuple | None = None


@dataclass(frozen=True)
class Preprocess:
    """How an image becomes the model's input for validation and inference alike: the augmentation family's
    preparation, its centre crop (fractions; None: the family's own), the input size, the backbone's mean
    and std, and the face crop (None: none)."""
    augmentation: str
    resize: tuple
    crop: tuple | None
    mean: tuple
    std: tuple
    face: FaceCropSpec | None = None

    @classmethod
    def from_flags(cls, config: dict) -> "Preprocess":
        """From train.py's flags, the backbone's `preprocessing` (mean, std) and, with --face_crop, the `faces`
        record (its fallback), as config.json holds them."""
        face = None
        if config.get("face_crop"):
            fallback = (config.get("faces") or {}).get("fallback")
            face = FaceCropSpec(config["face_detector"], float(config["face_score"]), float(config["face_margin"]),
                                None if fallback is None else tuple(fallback))
        crop = config.get("crop")
        return cls(config["augmentation"], tuple(config["resize"]), None if crop is None else tuple(crop),
                   tuple(config["preprocessing"]["mean"]), tuple(config["preprocessing"]["std"]), face)


@dataclass(frozen=True)
class TrainOptions:
    """How a run trains, fixed before its first epoch: its length and batches, timm's optimizer and schedule
    (`build_optimization` passes these to timm's factories), the EMA, batch mixing, gradient clipping, early
    stop, logging, and what the run folder keeps. The defaults are train.py's."""
    epochs: int = 10
    batch_size: int = 64
    grad_accum: int = 1
    lr: float = 0.001
    optimizer: str = "adamw"
    weight_decay: float = 0.01
    momentum: float = 0.9
    layer_decay: float | None = None
    scheduler: str = "cosine"
    lr_decay_step: int = 20
    lr_gamma: float = 0.5
    warmup_epochs: float = 0
    sched_on_updates: bool = False
    ema: float = 0.0
    seed: int = 42
    mixup: float = 0.0
    cutmix: float = 0.0
    mix_prob: float = 0.5
    clip_grad: float | None = None
    clip_mode: str = "norm"
    early_stop: int = 0
    log_interval: int = 20
    checkpoint_hist: int = 0
    keep_last: str = "on"
    report: str = "on"

    def __post_init__(self):
        """Each value checked here, the one place (flags.py builds the record before any work): a ValueError
        that names the flag."""
        if self.epochs <= 0 or self.batch_size <= 0 or self.grad_accum <= 0:
            raise ValueError("--epochs, --batch_size and --grad_accum must be positive")
        if not 0 <= self.warmup_epochs < self.epochs:
            raise ValueError(f"--warmup_epochs must be in [0, --epochs), got {self.warmup_epochs}")
        if self.warmup_epochs % 1 and not self.sched_on_updates:
            raise ValueError(f"--warmup_epochs {self.warmup_epochs}: a fraction of an epoch needs --sched_on_updates")
        if self.layer_decay is not None and not 0 < self.layer_decay <= 1:
            raise ValueError(f"--layer_decay must be in (0, 1], got {self.layer_decay}")
        if not 0 <= self.ema < 1:
            raise ValueError(f"--ema DECAY must be in [0, 1) (0: off), got {self.ema}")
        if self.mixup < 0 or self.cutmix < 0 or not 0 <= self.mix_prob <= 1:
            raise ValueError(f"--mixup and --cutmix must be >= 0 (0: off) and --mix_prob in [0, 1], got {self.mixup}, "
                             f"{self.cutmix} and {self.mix_prob}")
        if self.clip_grad is not None and self.clip_grad <= 0:
            raise ValueError(f"--clip_grad must be positive, got {self.clip_grad}")
        if self.early_stop < 0:
            raise ValueError(f"--early_stop must be >= 0 (0: off), got {self.early_stop}")
        if self.checkpoint_hist < 0:
            raise ValueError(f"--checkpoint_hist must be 0 (off) or a number of epochs to average, got "
                             f"{self.checkpoint_hist}")

    @classmethod
    def from_flags(cls, flags: dict) -> "TrainOptions":
        """From train.py's flags (a parsed namespace's vars, or a config.json: an older one lacks some, which
        take their defaults)."""
        return cls(**{f.name: flags[f.name] for f in fields(cls) if flags.get(f.name) is not None})


@dataclass(frozen=True)
class RunSpec:
    """What a run is: its preprocessing, what rebuilds its model (`model.build_model`'s arguments), where it
    was trained (train folder, age bins, cache folder, its --relabel file), which fold of which k-fold run
    it is, how it trained (TrainOptions; None: not readable from an older run), where its backbones'
    starting weights came from ({backbone: where}; None: not recorded), and the device kind and mixed
    precision it trained in."""
    preprocess: Preprocess
    model_args: dict
    data_dir: str
    age_bins: tuple
    cache_dir: str | None
    name: str
    run_dir: str
    fold: int | None = None
    n_folds: int = 0
    cache_features: bool = False
    freeze: str = "none"
    relabel: str | None = None
    training: TrainOptions | None = TrainOptions()
    starting_weights: dict | None = None
    device_type: str | None = None
    amp: str | None = None

    def to_json(self) -> dict:
        return dict(asdict(self), version=SPEC_VERSION)

    @classmethod
    def of(cls, config: dict) -> "RunSpec":
        """The spec of a run's config.json: the stored one, or one converted from an older version's flags."""
        stored = config.get("spec")
        if not isinstance(stored, dict) or stored.get("version") != SPEC_VERSION:
            return cls.from_flags(config)
        stored = {key: value for key, value in stored.items() if key != "version"}
        preprocess = dict(stored["preprocess"])
        face = preprocess.pop("face")
        preprocess = Preprocess(**{**preprocess, "resize": tuple(preprocess["resize"]),
                                   "crop": None if preprocess["crop"] is None else tuple(preprocess["crop"]),
                                   "mean": tuple(preprocess["mean"]), "std": tuple(preprocess["std"])},
                                face=FaceCropSpec(**{**face, "fallback": None if face["fallback"] is None
                                                     else tuple(face["fallback"])}) if face else None)
        return cls(**{**stored, "preprocess": preprocess, "age_bins": tuple(stored["age_bins"]),
                      "training": training_options(stored["training"]) if stored["training"] else None})

    @classmethod
    def from_flags(cls, config: dict) -> "RunSpec":
        """The spec from train.py's flags as a config.json records them (train.py itself, and run folders
        written before the spec existed; those before 2026-11-26 saved no `model_args` either)."""
        preprocess = Preprocess.from_flags(config)
        model_args = config.get("model_args")
        if model_args is None:
            backbones = config.get("backbones") or []
            backbones = dict(item.split("=", 1) for item in backbones) if isinstance(backbones, list) else backbones
            model_args = dict(kind=config["kind"], model=config["model"], backbones=backbones,
                              drop_rate=config.get("drop_rate", 0.0), drop_path_rate=config.get("drop_path_rate", 0.0),
                              age_years=bool(config.get("age_years", 0)), sources={})
        return cls(preprocess, model_args, config.get("data_dir", ""), tuple(config.get("age_bins", (30, 60))),
                   config.get("cache_dir"), config.get("name", ""), config.get("run_dir", ""), config.get("fold"),
                   config.get("n_folds", 0), bool(config.get("cache_features")), str(config.get("freeze", "none")),
                   config.get("relabel"), training_options(config), starting_weights(config),
                   config.get("device_type"), config.get("amp_resolved"))


def training_options(config) -> TrainOptions | None:
    """A config.json's TrainOptions; None where an older version allowed values today's checks refuse (its
    model still predicts: nothing but the report reads them)."""
    try:
        return TrainOptions.from_flags(config)
    except (ValueError, TypeError):
        return None


def starting_weights(config) -> dict | None:
    """{backbone: where its starting weights came from} as train.py records it, or for a run from before that
    record what its --pretrained asked for (what `auto` gave a timm name changed between versions, so it is
    shown as asked); None where neither is recorded."""
    recorded = config.get("starting_weights")
    if isinstance(recorded, dict) and recorded:
        return recorded
    pretrained, model = config.get("pretrained"), str(config.get("model", ""))
    if recorded:
        return {model: str(recorded)}
    if pretrained is None:
        return None
    if pretrained == "none":
        return {model: "random init (--pretrained none)"}
    if pretrained == "timm":
        return {model: "timm's pretrained weights (--pretrained timm)"}
    if pretrained == "auto":
        source = model.partition(":")[0].lower() in ("local-dir", "hf-hub")
        return {model: f"the source's own weights ({model})" if source else "--pretrained auto"}
    return {model: f"file {pretrained}"}

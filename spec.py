"""A run's spec: what a finished run folder says about how its model was made and how it sees an image, as
frozen records. train.py writes it into config.json (`"spec"`, with SPEC_VERSION) from its validated flags;
inference, ensembling, the audit and the report read it with `RunSpec.of(config)` instead of train.py's
flag names, so a renamed flag does not break a saved run. A config.json written before the spec existed is
converted from that version's flags, in `from_flags` alone."""
from dataclasses import asdict, dataclass

SPEC_VERSION = 2


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


@dataclass(frozen=True)
class RunSpec:
    """What a run is: its preprocessing, what rebuilds its model (`model.build_model`'s arguments), where it
    was trained (train folder, age bins, cache folder), and which fold of which k-fold run it is."""
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
        return cls(**{**stored, "preprocess": preprocess, "age_bins": tuple(stored["age_bins"])})

    @classmethod
    def from_flags(cls, config: dict) -> "RunSpec":
        """The spec from train.py's flags as a config.json records them (train.py itself, and run folders
        written before the spec existed; those before 2026-11-26 saved no `model_args` either)."""
        face = None
        if config.get("face_crop"):
            fallback = (config.get("faces") or {}).get("fallback")
            face = FaceCropSpec(config["face_detector"], float(config["face_score"]), float(config["face_margin"]),
                                None if fallback is None else tuple(fallback))
        crop = config.get("crop")
        preprocess = Preprocess(config["augmentation"], tuple(config["resize"]), None if crop is None else tuple(crop),
                                tuple(config["preprocessing"]["mean"]), tuple(config["preprocessing"]["std"]), face)
        model_args = config.get("model_args")
        if model_args is None:
            backbones = config.get("backbones") or []
            backbones = dict(item.split("=", 1) for item in backbones) if isinstance(backbones, list) else backbones
            model_args = dict(kind=config["kind"], model=config["model"], backbones=backbones,
                              drop_rate=config.get("drop_rate", 0.0), drop_path_rate=config.get("drop_path_rate", 0.0),
                              age_years=bool(config.get("age_years", 0)), sources={})
        return cls(preprocess, model_args, config.get("data_dir", ""), tuple(config.get("age_bins", (30, 60))),
                   config.get("cache_dir"), config.get("name", ""), config.get("run_dir", ""), config.get("fold"),
                   config.get("n_folds", 0), bool(config.get("cache_features")), str(config.get("freeze", "none")))

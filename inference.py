"""Predict an eval folder with a trained run: submission.csv plus a probability file, and with labels a
local score. Without --data_dir, the eval/ folder beside the run's training folder.

examples:
  python inference.py                                  # the newest run under ./model
  python inference.py --model_dir model/exp --data_dir /data/eval --tta hflip
"""
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader

from augment import preprocess_transform
from cache import DEFAULT_CACHE_DIR, BadImagesError, check_images, write_bad_images
from dataset import ImageFiles, PrefetchLoader, TestDataset, fast_collate, images_dir, scan_people
from faces import add_face_flags, check_face_flags, run_regions
from features import FromFeatures, frozen_outputs, predict_from_features, state_digest
from metrics import apply_offsets, class_report, fit_offsets, score
from model import TTA_CHOICES, build_model, freeze, predict
from precision import AMP_CHOICES, AMP_TIMINGS, CHANNELS_LAST_CHOICES, DEVICE_CHOICES, resolve_precision, select_device
from runs import (
    PROB_COLUMNS,
    is_run_folder,
    one_line_errors,
    probability_frame,
    read_config,
    read_probabilities,
    read_run,
    run_command,
    tool_parser,
    write_csv,
    write_json,
)
from spec import RunSpec

DEFAULT_MODEL_DIR = os.environ.get("SM_MODEL_DIR", "./model")


def newest_run(model_dir, checkpoint="best") -> Path:
    """The most recently written finished run folder under `model_dir` (or `model_dir` itself if it
    is one): folders without `<checkpoint>.pth` (a run that failed or was stopped before its first
    epoch) are passed over."""
    model_dir = Path(model_dir)
    if model_dir.is_file() and model_dir.name.endswith("_cv.json"):
        raise ValueError(f"{model_dir} is a k-fold run's summary: vote its folds with python ensemble.py {model_dir} "
                         "(inference.py predicts with one run folder)")
    if not model_dir.is_dir():
        raise FileNotFoundError(f"--model_dir not found: {model_dir}")
    if (model_dir / "config.json").is_file():
        read_config(model_dir, checkpoint)  # a one-line error for a baseline's or an unfinished run folder
        return model_dir
    runs = [p.parent for p in model_dir.glob("*/config.json") if is_run_folder(p.parent, checkpoint)]
    if not runs:
        raise FileNotFoundError(f"no finished run folder of train.py (config.json and {checkpoint}.pth) in "
                                f"{model_dir}: train one with train.py first")
    return max(runs, key=lambda p: (p / f"{checkpoint}.pth").stat().st_mtime)


def eval_dir_for(data_dir, configs) -> tuple:
    """(the eval folder, why it was chosen) for --data_dir `data_dir` (None: not given). Not given: the
    `eval/` folder beside the training folder of the runs (`configs`), which must agree; where there is
    none, a one-line error (never the bundled sample for a run trained elsewhere)."""
    if data_dir:
        return Path(data_dir), "--data_dir"
    if os.environ.get("SM_CHANNEL_EVAL"):
        return Path(os.environ["SM_CHANNEL_EVAL"]), "SM_CHANNEL_EVAL"
    beside = {}
    for spec in map(RunSpec.of, configs):
        train_dir = Path(spec.data_dir)
        root = train_dir.parent.parent if train_dir.name == "images" else train_dir.parent
        beside.setdefault(root / "eval", []).append(spec.run_dir or "a run")
    if not beside:
        raise ValueError("--data_dir: give the eval folder (info.csv + images/); probability files do not say "
                         "which folder they predicted")
    if len(beside) > 1:
        raise ValueError("--data_dir: the runs were trained on different folders ("
                         + ", ".join(str(path.parent) for path in beside) + "): give the eval folder")
    eval_dir = next(iter(beside))
    if not (eval_dir / "info.csv").is_file():
        raise FileNotFoundError(f"--data_dir: no eval folder given, and none beside the run's training folder "
                                f"({eval_dir} has no info.csv): pass --data_dir EVAL_DIR")
    return eval_dir, f"beside the run's training folder {eval_dir.parent / 'train'}; --data_dir to choose another"


def fold_note(run_dir, config) -> str:
    """"; this is fold ..." where `run_dir` (its `config`) is one fold of a k-fold run (the others are not
    used), else ""."""
    spec = RunSpec.of(config)
    if not spec.n_folds or spec.fold is None:
        return ""
    summary = Path(run_dir).parent / f"{spec.name}_cv.json"
    return (f"; this is fold {spec.fold} of {spec.n_folds}: python ensemble.py {summary} votes them all"
            if summary.is_file() else f"; this is fold {spec.fold} of {spec.n_folds}")


def chosen_device(asked) -> torch.device:
    """--device resolved (a DeviceError, one line, for a GPU this torch cannot use), cuDNN's kernel timing on."""
    device = select_device(asked)
    torch.backends.cudnn.benchmark = device.type == "cuda"
    return device


def check_loader_flags(args) -> None:
    """One-line errors for --batch_size and --num_workers before any work (inference and ensembling)."""
    if args.batch_size <= 0:
        raise ValueError(f"--batch_size must be positive, got {args.batch_size}")
    if args.num_workers < 0:
        raise ValueError(f"--num_workers must be >= 0, got {args.num_workers}")


def check_eval_images(paths, output_dir, num_workers, bad_images="stop", cache_dir=DEFAULT_CACHE_DIR) -> list:
    """Decode every eval image once before predicting (remembered for unchanged files) and return the
    unreadable ones' paths, listed in `output_dir/bad_images.csv`. `bad_images` "stop": any unreadable
    image stops the command (no image is dropped); "fill": they are warned about and returned, for
    `Predictor.predict` to fill their rows."""
    bad = check_images(paths, cache_dir, num_workers)
    if not bad:
        return []
    listing = write_bad_images(bad, Path(output_dir) / "bad_images.csv")
    if bad_images == "stop" or len(bad) == len(paths):
        raise BadImagesError(bad, f"{listing}; every eval image needs a prediction: fix or replace them, or pass "
                                  "--bad_images fill to predict them as the mean of the others")
    print(f"warning: {len(bad)} unreadable eval image(s) predicted as the mean of the others' probabilities "
          f"(--bad_images fill), listed in {listing}: {', '.join(path for path, _ in bad[:3])}"
          + (" ..." if len(bad) > 3 else ""), file=sys.stderr)
    return [path for path, _ in bad]


def eval_images(data_dir):
    """(image ids, paths, 18-class labels or None, info table or None) of an eval folder
    (info.csv + images/) or of a labelled train-layout folder (a local hold-out)."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise FileNotFoundError(f"eval folder not found: {data_dir}")
    if (data_dir / "info.csv").is_file():
        dataset = TestDataset(data_dir)
        return list(dataset.info["ImageID"]), dataset.paths, None, dataset.info
    if not any(p.is_dir() for p in images_dir(data_dir).iterdir()):
        raise FileNotFoundError(f"{data_dir} has no info.csv (an eval folder) and no person folders "
                                "(a labelled train-layout folder)")
    table = scan_people(data_dir, check_images=False)
    root = Path(table["path"].iloc[0]).parents[1]
    ids = [str(Path(p).relative_to(root)) for p in table["path"]]
    return ids, list(table["path"]), table["class"].to_numpy(), None


@dataclass(frozen=True)
class PredictOptions:
    """How run folders predict: the same for every member of an ensemble (the flags of inference.py and
    ensemble.py). `amp` and `channels_last` take train.py's choices (auto: what this device and model run
    fastest with); `face_detector`: where a --face_crop run's detector file moved; `cache_dir`: the image
    check, the face boxes and the precision timings; `no_face_csv`: where a --face_crop run lists the images
    it found no face in (no_face.csv beside the submission)."""
    checkpoint: str = "best"
    batch_size: int = 256
    amp: str = "auto"
    channels_last: str = "auto"
    tta: str = "none"
    num_workers: int = 2
    device: torch.device | None = None
    face_detector: str | None = None
    cache_dir: str = DEFAULT_CACHE_DIR
    no_face_csv: Path | None = None

    @classmethod
    def from_args(cls, args, device, checkpoint="best", no_face_csv=None):
        return cls(checkpoint, args.batch_size, args.amp, args.channels_last, args.tta, args.num_workers, device,
                   args.face_detector, args.cache_dir, no_face_csv)


class FrozenStages:
    """The frozen stages' outputs of --cache_features runs, computed once for every run that shares those
    stages (an ensemble's members), which then only run the layers after them. Keyed by the frozen weights,
    the images, how they are prepared, and the TTA."""

    def __init__(self):
        self.outputs = {}

    def outputs_for(self, rest, loader, paths, regions, predictor):
        key = (state_digest(rest.frozen), tuple(map(str, paths)), tuple(regions), predictor.spec.preprocess,
               predictor.options.tta)
        if key not in self.outputs:  # in the first member's precision (auto may time another for the next)
            self.outputs[key] = frozen_outputs(rest.frozen, loader, predictor.amp, predictor.options.tta,
                                               predictor.channels_last)
        return self.outputs[key]


class Predictor:
    """A run folder's model, ready to predict images as it was trained to see them: the model, input size,
    crop, face crop and mean/std all come from the run's config.json, the precision from `options`."""

    def __init__(self, run_dir, options=PredictOptions(), frozen_stages=None):
        self.run_dir, self.options, self.frozen_stages = Path(run_dir), options, frozen_stages
        config, state = read_run(run_dir, options.checkpoint)
        self.spec = RunSpec.of(config)
        self.device = torch.device(options.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = build_model(**self.spec.model_args)
        try:
            self.model.load_state_dict(state["model"])
        except RuntimeError as error:
            raise ValueError(f"{run_dir}/{options.checkpoint}.pth does not fit the model its config.json describes "
                             f"({str(error).splitlines()[0]}): a run folder of another version?") from None
        self.amp, self.channels_last, line = resolve_precision(
            self.model, options.amp, options.channels_last, self.device, self.spec.preprocess.resize,
            options.batch_size, train=False, remember=Path(options.cache_dir) / AMP_TIMINGS)
        print(f"{self.run_dir.name}: {line}")
        self.model.to(self.device, memory_format=torch.channels_last if self.channels_last else torch.preserve_format)

    def predict(self, paths, unreadable=()) -> np.ndarray:
        """18-class probabilities (N, 18) of the images at `paths`. The `unreadable` paths are not decoded:
        their rows get the mean of the others'."""
        return filled_unreadable(self.predict_readable, paths, unreadable)

    def predict_readable(self, paths) -> np.ndarray:
        spec, options = self.spec, self.options
        regions = run_regions(spec, paths, options.face_detector, options.cache_dir, options.num_workers,
                              options.no_face_csv)
        loader = DataLoader(ImageFiles(paths, preprocess_transform(spec.preprocess), regions), options.batch_size,
                            num_workers=options.num_workers, collate_fn=fast_collate,
                            pin_memory=self.device.type == "cuda")
        loader = PrefetchLoader(loader, spec.preprocess.mean, spec.preprocess.std, self.device)
        if self.frozen_stages is not None and spec.cache_features:
            freeze(self.model, spec.freeze)
            rest = FromFeatures(self.model)
            features = self.frozen_stages.outputs_for(rest, loader, paths, regions, self)
            return predict_from_features(rest, features, self.amp, options.batch_size, self.channels_last).numpy()
        probs, _ = predict(self.model, loader, self.amp, options.tta, progress=True, channels_last=self.channels_last)
        return probs.numpy()


def filled_unreadable(predict_paths, paths, unreadable) -> np.ndarray:
    """`predict_paths(readable paths)` for the readable ones among `paths`, the `unreadable` ones' rows filled
    with the mean of the others' probabilities (inference.py --bad_images fill)."""
    unreadable = set(map(str, unreadable))
    readable = np.array([str(p) not in unreadable for p in paths], dtype=bool)
    if readable.all():
        return predict_paths(list(paths))
    probs = np.empty((len(paths), 18), dtype=np.float32)
    probs[readable] = predict_paths([p for p, ok in zip(paths, readable, strict=True) if ok])
    probs[~readable] = probs[readable].mean(0)
    return probs


def read_labels(path, image_ids) -> np.ndarray:
    """18-class labels from a CSV with ImageID and ans, in the order of `image_ids`."""
    labels = pd.read_csv(path, dtype={"ImageID": str})
    if not {"ImageID", "ans"} <= set(labels):
        raise ValueError(f"{path}: a labels file needs columns ImageID and ans")
    found = labels.set_index("ImageID")["ans"].reindex(image_ids)
    if found.isna().any():
        raise ValueError(f"{path}: no label for {int(found.isna().sum())} images, e.g. {found[found.isna()].index[0]}")
    return found.to_numpy().astype(int)


def report(labels, probs) -> dict:
    """Print macro F1, per-head accuracy and F1, and the per-class report; return the scores."""
    scores = score(labels, probs)
    print(f"macro F1 {scores['f1']:.4f}  accuracy {scores['acc']:.4f}  " + "  ".join(
        f"{head} acc {scores[f'{head}_acc']:.4f} F1 {scores[f'{head}_f1']:.4f}" for head in ("mask", "gender", "age")))
    print(class_report(labels, probs))
    return scores


def add_output_flags(parser, name):
    """--output_dir, --name (default `name`) and --batch_size, as inference.py and ensemble.py take them."""
    parser.add_argument("--output_dir", default=os.environ.get("SM_OUTPUT_DATA_DIR", "./output"),
                        help="where the submission and its probability file are written")
    parser.add_argument("--name", default=name, help="submission file name")
    parser.add_argument("--batch_size", type=int, default=256, help="images per batch (run folders)")


def add_precision_flags(parser):
    """--device, --amp and --channels_last, as in train.py (auto: the fastest right choice for this machine)."""
    parser.add_argument("--device", default="auto", choices=DEVICE_CHOICES,
                        help="auto: the GPU where this torch can use it, else the CPU; cuda: the GPU or a one-line "
                             "error saying why not")
    parser.add_argument("--amp", default="auto", choices=AMP_CHOICES,
                        help="auto: bf16 on GPUs (8.0+), fp16 on older GPUs; on a CPU with native bf16 the "
                             "faster of bf16 and fp32 as timed on the model (bf16 only if 10%% faster); else off")
    parser.add_argument("--channels_last", nargs="?", const="on", default="auto", choices=CHANNELS_LAST_CHOICES,
                        help="auto: on for convolutional models")


def add_bad_images_flag(parser):
    parser.add_argument("--bad_images", default="stop", choices=["stop", "fill"],
                        help="unreadable eval images: stop with their list, or fill: predict each as the mean of "
                             "the other images' probabilities (warned, listed in bad_images.csv)")


def build_parser():
    parser = tool_parser(__doc__)
    parser.add_argument("--model_dir", default=DEFAULT_MODEL_DIR,
                        help="a run folder, or a folder of runs (the newest finished one)")
    parser.add_argument("--checkpoint", default="best", choices=["best", "last", "avg"],
                        help="avg: the average of the best epochs kept by train.py --checkpoint_hist K")
    parser.add_argument("--data_dir", default=None,
                        help="eval folder (info.csv + images/), or a labelled train-layout folder to score "
                             "(default: the eval/ beside the run's training folder)")
    add_output_flags(parser, "submission.csv")
    add_precision_flags(parser)
    parser.add_argument("--tta", default="hflip", choices=TTA_CHOICES,
                        help="hflip averages plain and flipped predictions (+0.01 to +0.03 macro F1 on utkmask)")
    parser.add_argument("--num_workers", type=int, default=min(4, os.cpu_count() or 1),
                        help="data loader processes (0: load in this process)")
    parser.add_argument("--labels", default=None, help="CSV with ImageID and ans: score the predictions")
    parser.add_argument("--calibrate", action="store_true",
                        help="add per-class offsets fitted for macro F1 on the run's validation probabilities")
    add_bad_images_flag(parser)
    add_face_flags(parser)
    parser.add_argument("--overwrite", action="store_true", help="replace existing output files")
    return parser


def output_paths(output_dir, name, overwrite):
    """(submission path, probability path); refuses to replace files unless `overwrite`."""
    submission = Path(output_dir) / name
    probs = submission.with_name(f"{submission.stem}_probs.csv")
    for path in (submission, probs):
        if path.exists() and not overwrite:
            raise FileExistsError(f"{path} exists: pass --overwrite or another --name")
    return submission, probs


def validation_offsets(run_dirs) -> np.ndarray:
    """Per-class log-prior offsets fitted for macro F1 on the runs' validation probabilities
    (val_probs.csv; for the folds of a k-fold run together they are out-of-fold), averaged per image
    where runs share validation images."""
    frames = []
    for run_dir in map(Path, run_dirs):
        path = run_dir / "val_probs.csv"
        if not path.is_file():
            raise FileNotFoundError(f"--calibrate: {run_dir} has no val_probs.csv to fit the offsets on")
        frames.append(read_probabilities(path)[["ImageID", "ans", *PROB_COLUMNS]])
    pooled = pd.concat(frames).groupby("ImageID").agg({"ans": "first", **{c: "mean" for c in PROB_COLUMNS}})
    return fit_offsets(pooled["ans"].to_numpy(), pooled[PROB_COLUMNS].to_numpy())


def write_submission(submission_path, probs_path, image_ids, probs, info=None, classes=None):
    """Write the submission (info.csv's rows, order and columns with `ans` = `classes`, by default
    the argmax of `probs`) and the probability file, atomically."""
    submission_path.parent.mkdir(parents=True, exist_ok=True)
    preds = probs.argmax(1) if classes is None else classes
    frame = info.assign(ans=preds) if info is not None else pd.DataFrame({"ImageID": image_ids, "ans": preds})
    write_csv(submission_path, frame)
    write_csv(probs_path, probability_frame(image_ids, probs))


def main(argv=None):
    args = build_parser().parse_args(argv)
    with one_line_errors():
        check_loader_flags(args)
        device = chosen_device(args.device)
        run_dir = newest_run(args.model_dir, args.checkpoint)
        config = read_config(run_dir, args.checkpoint)
        check_face_flags(args, [RunSpec.of(config)])
        data_dir, why = eval_dir_for(args.data_dir, [config])
        submission, probs_path = output_paths(args.output_dir, args.name, args.overwrite)
        image_ids, paths, labels, info = eval_images(data_dir)
        if args.labels:
            labels = read_labels(args.labels, image_ids)
        offsets = validation_offsets([run_dir]) if args.calibrate else None
        unreadable = check_eval_images(paths, args.output_dir, args.num_workers, args.bad_images, args.cache_dir)
        print(f"predicting {len(paths)} images of {data_dir} ({why}) with {run_dir} ({args.checkpoint}.pth, "
              f"tta {args.tta})" + fold_note(run_dir, config))
        options = PredictOptions.from_args(args, device, args.checkpoint, submission.with_name("no_face.csv"))
        probs = Predictor(run_dir, options).predict(paths, unreadable)
        if offsets is not None:
            probs = apply_offsets(probs, offsets)
        write_submission(submission, probs_path, image_ids, probs, info)
        if offsets is not None:
            write_json(submission.with_name(f"{submission.stem}_offsets.json"), offsets.round(3).tolist())
    print(f"wrote {submission} and {probs_path}")
    if labels is not None:
        write_json(submission.with_name(f"{submission.stem}_scores.json"), report(labels, probs))
    return probs


if __name__ == "__main__":
    run_command(main)

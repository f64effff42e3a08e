"""Vote several runs or probability files into one submission. Without --data_dir, the runs' eval folder
is the eval/ beside their training folder.

examples:
  python ensemble.py model/exp model/exp2 output/other_probs.csv --weights 2 1 1 --method soft
  python ensemble.py model/exp_cv.json --per_head            # every fold of a k-fold run
"""
import glob
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from faces import add_face_flags, check_face_flags, run_regions
from inference import (
    FrozenStages,
    PredictOptions,
    Predictor,
    add_bad_images_flag,
    add_output_flags,
    add_precision_flags,
    check_eval_images,
    check_loader_flags,
    chosen_device,
    eval_dir_for,
    eval_images,
    output_paths,
    read_labels,
    report,
    validation_offsets,
    write_submission,
)
from labels import HEADS, combine_heads, encode_multi_class, head_probs
from metrics import apply_offsets, score
from model import TTA_CHOICES
from runs import (
    PROB_COLUMNS,
    one_line_errors,
    probability_frame,
    read_config,
    read_folds,
    read_probabilities,
    run_command,
    tool_parser,
    write_csv,
    write_json,
)
from spec import RunSpec


def expand_inputs(inputs) -> list:
    """Run folders, probability files, k-fold summaries (`<name>_cv.json`) and glob patterns ->
    a flat list of run folders and probability files."""
    expanded = []
    for item in inputs:
        matches = sorted(glob.glob(item)) if any(c in item for c in "*?[") else [item]
        if not matches:
            raise FileNotFoundError(f"no input matches {item}")
        for path in map(Path, matches):
            if path.suffix == ".json" and path.is_file():
                expanded.extend(read_folds(path))
            elif path.is_dir() or path.is_file():
                expanded.append(path)
            else:
                raise FileNotFoundError(f"input not found: {path}")
    return expanded


def run_probabilities(run_dir, images, options, frozen_stages=None) -> np.ndarray:
    """A run folder's eval probabilities for `images` (EvalImages): read from `eval_probs.csv` when it was
    made for the same eval folder, TTA, checkpoint and unreadable images, else predicted (a Predictor with
    `options`; --cache_features members share their frozen stages' outputs in `frozen_stages`) and stored there."""
    cache, source = run_dir / "eval_probs.csv", run_dir / "eval_probs.json"
    key = dict(data_dir=str(Path(images.folder).resolve()), tta=options.tta, n_images=len(images.ids),
               checkpoint_mtime_ns=(run_dir / "best.pth").stat().st_mtime_ns,
               unreadable=sorted(map(str, images.unreadable)))
    if cache.is_file() and source.is_file() and json.loads(source.read_text()) == key:
        if options.no_face_csv:  # a --face_crop member still lists its images without a face (boxes cached)
            skipped = set(map(str, images.unreadable))
            readable = [p for p in images.paths if str(p) not in skipped]
            run_regions(RunSpec.of(read_config(run_dir)), readable, options.face_detector, options.cache_dir,
                        options.num_workers, options.no_face_csv)
        return aligned(read_probabilities(cache), images.ids, cache)
    probs = Predictor(run_dir, options, frozen_stages).predict(images.paths, images.unreadable)
    write_csv(cache, probability_frame(images.ids, probs))
    write_json(source, key)
    return probs


@dataclass(frozen=True)
class EvalImages:
    """An eval folder's images, in info.csv's order, and the unreadable ones among them."""
    folder: Path
    ids: list
    paths: list
    unreadable: tuple = ()


def mixed_age_bins(run_dirs) -> str | None:
    """A note where the runs were trained with different `--age_bins` (e.g. the 58 cutoff beside 60):
    their age groups are voted as the same three classes, which may be meant; None where they agree."""
    bins = {}
    for run_dir in run_dirs:
        bins.setdefault(RunSpec.of(read_config(run_dir)).age_bins, []).append(run_dir.name)
    if len(bins) < 2:
        return None
    groups = "; ".join(f"{' '.join(map(str, edges)) or 'unknown'}: {', '.join(names[:3])}"
                       + (" ..." if len(names) > 3 else "") for edges, names in bins.items())
    return f"note: the runs were trained with different --age_bins ({groups}); their age groups are voted as one"


def aligned(frame, image_ids, name) -> np.ndarray:
    """The 18 probability columns of `frame` in the order of `image_ids`; the ImageIDs must match."""
    given, wanted = set(frame["ImageID"]), set(image_ids)
    if given != wanted:
        missing, extra = sorted(wanted - given), sorted(given - wanted)
        raise ValueError(f"{name}: ImageIDs differ from the eval folder ({len(missing)} missing, e.g. "
                         f"{missing[:2]}; {len(extra)} extra, e.g. {extra[:2]})")
    return frame.set_index("ImageID").loc[list(image_ids), PROB_COLUMNS].to_numpy(dtype=np.float64)


def vote(probs, weights, method="soft"):
    """probs (K, N, C), weights (K,) -> (predicted classes (N,), weighted mean probabilities (N, C)).
    soft: argmax of the weighted mean; hard: weighted majority of the inputs' argmax, ties broken by
    the weighted mean probability of the tied classes."""
    weights = np.asarray(weights, dtype=np.float64)
    mean = np.tensordot(weights, probs, axes=1) / weights.sum()
    if method == "soft":
        return mean.argmax(1), mean
    votes = np.zeros_like(mean)
    for w, p in zip(weights, probs, strict=True):
        votes[np.arange(len(mean)), p.argmax(1)] += w
    tied = votes == votes.max(1, keepdims=True)
    return np.where(tied, mean, -np.inf).argmax(1), mean


def ensemble(probs, weights, method="soft", per_head=False, head_weights=None):
    """Classes (N,) and probabilities (N, 18) of the ensemble; `per_head` votes mask, gender and
    age separately (on each input's marginals) and combines the three winners; `head_weights` (head ->
    one weight per input; heads it leaves out use `weights`) votes per head with weights of its own."""
    if not per_head and not head_weights:
        return vote(probs, weights, method)
    head_weights = head_weights or {}
    (mask, mask_p), (gender, gender_p), (age, age_p) = (vote(p, head_weights.get(head, weights), method)
                                                        for head, p in head_probs(probs).items())
    return encode_multi_class(mask, gender, age), combine_heads(mask_p, gender_p, age_p)


def parse_head_weights(items, n_inputs) -> dict:
    """`mask=1,0,0 age=0,1,2` -> {head: [one weight per input]}; one-line errors."""
    weights = {}
    for item in items:
        head, _, values = item.partition("=")
        if head not in HEADS or not values:
            raise ValueError(f"--head_weights {item!r}: write HEAD=W1,W2,... with HEAD one of {', '.join(HEADS)}")
        try:
            numbers = [float(v) for v in values.split(",")]
        except ValueError:
            raise ValueError(f"--head_weights {item!r}: the weights must be numbers") from None
        if len(numbers) != n_inputs or min(numbers) < 0 or sum(numbers) <= 0:
            raise ValueError(f"--head_weights {item!r}: needs {n_inputs} non-negative weights, not all zero")
        weights[head] = numbers
    return weights


def select_per_head(inputs) -> tuple:
    """For each head, the input (a run folder) whose validation probabilities (val_probs.csv; out-of-fold
    for a fold of a k-fold run) score the best F1 on that head: ({head: one-hot weights}, the lines that
    say what was chosen). The runs' validation people may differ (other seeds or folds): a guide."""
    scores = []
    for path in inputs:
        if not (path.is_dir() and (path / "val_probs.csv").is_file()):
            raise FileNotFoundError(f"--select_per_head: {path} is not a run folder with val_probs.csv")
        frame = read_probabilities(path / "val_probs.csv")
        scores.append(score(frame["ans"].to_numpy(), frame[PROB_COLUMNS].to_numpy()))
    weights, lines = {}, []
    for head in HEADS:
        best = int(np.argmax([s[f"{head}_f1"] for s in scores]))
        weights[head] = [1.0 if i == best else 0.0 for i in range(len(inputs))]
        lines.append(f"{head}: {inputs[best]} (validation {head} F1 {scores[best][f'{head}_f1']:.3f}; "
                     + ", ".join(f"{s[f'{head}_f1']:.3f}" for s in scores) + ")")
    return weights, lines


def build_parser():
    parser = tool_parser(__doc__)
    parser.add_argument("inputs", nargs="+", help="run folders, probability CSVs, <name>_cv.json or globs")
    parser.add_argument("--weights", type=float, nargs="*", default=None, help="one per input (default: equal)")
    parser.add_argument("--method", default="soft", choices=["soft", "hard"],
                        help="soft: the mean probability; hard: the majority of the inputs' classes")
    parser.add_argument("--per_head", action="store_true", help="vote mask, gender and age separately")
    parser.add_argument("--head_weights", nargs="*", default=[], metavar="HEAD=W1,W2,...",
                        help="per-head weights, one per input, e.g. mask=1,0,0 age=0,1,2 (votes per head)")
    parser.add_argument("--select_per_head", action="store_true",
                        help="for each head, use the run folder with the best validation F1 on it (val_probs.csv)")
    parser.add_argument("--data_dir", default=None,
                        help="eval folder: its info.csv gives the rows and their order (default: the eval/ beside "
                             "the runs' training folder)")
    add_output_flags(parser, "ensemble.csv")
    parser.add_argument("--tta", default="hflip", choices=TTA_CHOICES, help="for run folders")
    add_precision_flags(parser)
    parser.add_argument("--num_workers", type=int, default=min(4, os.cpu_count() or 1),
                        help="data loader processes (0: load in this process)")
    parser.add_argument("--labels", default=None, help="CSV with ImageID and ans: score the ensemble")
    parser.add_argument("--calibrate", action="store_true",
                        help="add per-class offsets fitted for macro F1 on the run folders' validation probabilities "
                             "(out-of-fold for k-fold members) to every input before voting")
    add_bad_images_flag(parser)
    add_face_flags(parser)
    parser.add_argument("--overwrite", action="store_true", help="replace existing output files")
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    with one_line_errors():
        check_loader_flags(args)
        device = chosen_device(args.device)
        inputs = expand_inputs(args.inputs)
        weights = args.weights or [1.0] * len(inputs)
        if len(weights) != len(inputs):
            raise ValueError(f"--weights: {len(weights)} weights for {len(inputs)} inputs")
        if min(weights) < 0 or sum(weights) <= 0:
            raise ValueError("--weights must be non-negative and not all zero")
        head_weights = parse_head_weights(args.head_weights, len(inputs))
        if args.select_per_head:
            if head_weights:
                raise ValueError("--select_per_head chooses the per-head weights: drop --head_weights")
            head_weights, lines = select_per_head(inputs)
            print("chosen per head:\n  " + "\n  ".join(lines))
        submission, probs_path = output_paths(args.output_dir, args.name, args.overwrite)
        configs = [read_config(path, "best") for path in inputs if path.is_dir()]
        data_dir, why = eval_dir_for(args.data_dir, configs)
        print(f"eval folder {data_dir} ({why})")
        image_ids, paths, labels, info = eval_images(data_dir)
        if args.labels:
            labels = read_labels(args.labels, image_ids)
        check_face_flags(args, [RunSpec.of(config) for config in configs])
        note = mixed_age_bins([path for path in inputs if path.is_dir()])
        if note:
            print(note)
        offsets = None
        if args.calibrate:
            run_dirs = [path for path in inputs if path.is_dir()]
            if not run_dirs:
                raise ValueError("--calibrate fits on run folders' val_probs.csv: give run folders or <name>_cv.json")
            offsets = validation_offsets(run_dirs)
        files = {path: aligned(read_probabilities(path), image_ids, path) for path in inputs if path.is_file()}
        unreadable = []
        if len(files) < len(inputs):
            unreadable = check_eval_images(paths, args.output_dir, args.num_workers, args.bad_images, args.cache_dir)
        images = EvalImages(data_dir, image_ids, paths, tuple(unreadable))
        options = PredictOptions.from_args(args, device, no_face_csv=submission.with_name("no_face.csv"))
        frozen_stages = FrozenStages()  # shared by the members
        probs = np.stack([files[path] if path in files else run_probabilities(path, images, options, frozen_stages)
                          for path in inputs])
        if offsets is not None:
            probs = np.stack([apply_offsets(p, offsets) for p in probs])
    classes, mean = ensemble(probs, weights, args.method, args.per_head, head_weights)
    write_submission(submission, probs_path, image_ids, mean, info, classes)
    if args.calibrate:
        write_json(submission.with_name(f"{submission.stem}_offsets.json"), offsets.round(3).tolist())
    kind = " per-head" if args.per_head or head_weights else ""
    print(f"{args.method}{kind} vote of {len(inputs)} inputs -> {submission}")
    if labels is not None:
        report(labels, np.eye(18)[classes])
    return classes


if __name__ == "__main__":
    run_command(main)

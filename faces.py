"""Face boxes for photos where the face is not framed for us (`--face_crop`): every image's face is found
once with an offline detector (OpenCV's YuNet, `cv2.FaceDetectorYN`), the boxes are kept in the cache
folder keyed like the image check (absolute path, size, mtime, and the detector's settings), and the
transforms crop a square of `margin` times the box's larger side around the chosen face, padded by edge
replication where it leaves the image. Images without a face take the typical face square of the run's
training images instead (the median face position and size, relative to the image: the competition's
photos are framed alike), or the usual centre crop where no training image had a face.

    python faces.py DIR [--face_detector FILE] [--output_dir faces]   # boxes.csv + a contact sheet of the crops
"""
import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from augment import crop_region
from cache import DEFAULT_CACHE_DIR, file_stamp, locked
from dataset import IMAGE_EXTENSIONS, decode_image
from runs import atomic_write, one_line_errors, tool_parser, write_csv

DEFAULT_DETECTOR = str(Path(__file__).resolve().parent / "weights" / "face_detection_yunet_2026may.onnx")  # ships
DEFAULT_MARGIN = 1.05  # on utkmask aligned crops 160 px over the box side is 0.99-1.06 (quartiles): about their crop
DEFAULT_SCORE = 0.5  # YuNet's 0.9 keeps about 30% of real masked faces; 0.5 about 93%
MARGIN_RANGE = (1.0, 3.0)
DETECT_SIDE = 320  # images whose longer side is smaller are upscaled to it before detection
FACES_VERSION = 2  # 2: the cache keeps each image's size (for the typical face square)


class FaceDetectorError(ValueError):
    """A missing or damaged detector file, or a bad detector setting (one line)."""


class YuNet:
    """OpenCV's YuNet face detector. `detect(rgb)`: (n, 5) boxes x, y, w, h, score in the image's pixels.
    Small images are upscaled first; where nothing is found, the image is padded by a third of each side
    and tried again (a face that fills a tight crop has no margin for the detector)."""

    def __init__(self, path, score=DEFAULT_SCORE, nms=0.3, top_k=20):
        self.path, self.score, self.nms, self.top_k = str(path), float(score), nms, top_k
        check_face_settings(score=self.score, detector=self.path)
        self._net = None
        self.net()  # a damaged file fails here, before any work

    def net(self):
        if self._net is None:
            try:
                import cv2
            except ImportError:
                raise FaceDetectorError("--face_crop needs opencv-python-headless: pip install -r requirements.txt") \
                    from None
            cv2.setNumThreads(1)
            cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)  # YuNet warns on every creation
            try:
                self._net = cv2.FaceDetectorYN.create(self.path, "", (DETECT_SIDE, DETECT_SIDE), self.score,
                                                      self.nms, self.top_k)
            except cv2.error as error:
                detail = str(error).strip().splitlines()[-1][:120]
                raise FaceDetectorError(f"--face_detector: {self.path} is not a readable YuNet ONNX model "
                                        f"({detail})") from None
        return self._net

    def __getstate__(self):
        return {**self.__dict__, "_net": None}

    def detect(self, rgb: np.ndarray) -> np.ndarray:
        boxes = self._detect(rgb)
        if len(boxes) == 0:
            height, width = rgb.shape[:2]
            pad_h, pad_w = height // 3, width // 3
            padded = np.pad(rgb, ((pad_h, pad_h), (pad_w, pad_w), (0, 0)), mode="edge")
            boxes = self._detect(padded)
            boxes[:, 0] -= pad_w
            boxes[:, 1] -= pad_h
        return boxes

    def _detect(self, rgb):
        import cv2
        height, width = rgb.shape[:2]
        scale = max(1.0, DETECT_SIDE / max(height, width))
        image = cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2BGR)
        if scale > 1:
            image = cv2.resize(image, (round(width * scale), round(height * scale)), interpolation=cv2.INTER_LINEAR)
        net = self.net()
        net.setInputSize((image.shape[1], image.shape[0]))
        _, found = net.detect(image)
        if found is None:
            return np.zeros((0, 5), np.float32)
        boxes = found[:, [0, 1, 2, 3, 14]].astype(np.float32)
        boxes[:, :4] /= scale
        return boxes


def choose_face(boxes, height, width):
    """The face of the photo among `boxes` (x, y, w, h, score): the highest score times nearness to the
    image centre (1 at the centre, 0 at a corner), so that a confident face in the background does not
    win over the person in front. None where there is no box."""
    if len(boxes) == 0:
        return None
    boxes = np.asarray(boxes, dtype=np.float64)
    centre_x, centre_y = boxes[:, 0] + boxes[:, 2] / 2, boxes[:, 1] + boxes[:, 3] / 2
    distance = np.hypot(centre_x - width / 2, centre_y - height / 2) / (np.hypot(width, height) / 2)
    best = int(np.argmax(boxes[:, 4] * np.clip(1 - distance, 0, 1)))
    return tuple(float(v) for v in boxes[best])


def square_box(box, margin) -> tuple:
    """(top, left, side) of the square of `margin` times the box's larger side around its centre."""
    x, y, w, h = box[:4]
    side = max(1, round(margin * max(w, h)))
    return round(y + h / 2 - side / 2), round(x + w / 2 - side / 2), side


def typical_face(boxes: dict, sizes: dict):
    """The median face of `boxes` (path -> box or None) relative to each image's size (path -> (height,
    width)): (centre x / width, centre y / height, larger side / smaller image side), rounded, or None
    where no image has a face. Images without a face are cropped there (`FaceCrop.region`)."""
    found = [(box, sizes[path]) for path, box in boxes.items() if box is not None and sizes.get(path)]
    if not found:
        return None
    relative = np.array([((x + w / 2) / width, (y + h / 2) / height, max(w, h) / min(height, width))
                         for (x, y, w, h, _), (height, width) in found])
    return tuple(round(float(v), 4) for v in np.median(relative, axis=0))


def typical_box(fallback, height, width) -> tuple:
    """The typical face (`typical_face`) as a box (x, y, w, h) in an image of this size."""
    centre_x, centre_y, side = fallback
    side = side * min(height, width)
    return centre_x * width - side / 2, centre_y * height - side / 2, side, side


class FaceCrop:
    """The faces found in a set of images, as data: each image's chosen box (by absolute path; None where no
    face was found) and its (height, width), the margin, `fallback` (the typical face, `typical_face`,
    that images without one are cropped at; None: they keep the centre crop) and the detector's
    `settings` (config.json's record). `regions(paths)` is what a dataset holds: each image's crop
    square, which the transforms crop instead of the centre."""

    def __init__(self, boxes: dict, margin=DEFAULT_MARGIN, settings=None, fallback=None, sizes=None):
        self.boxes, self.margin, self.sizes = boxes, float(margin), sizes or {}
        self.fallback = None if fallback is None else tuple(float(v) for v in fallback)
        self.settings = dict(settings or {}, margin=self.margin, fallback=self.fallback)

    def found(self, path) -> bool:
        return self.boxes.get(os.path.abspath(path)) is not None

    def region(self, path, size=None):
        """(top, left, side) of the square cropped from image `path`: around its face, or where it has none
        the typical face's square (its (height, width): `size`, or the one recorded at detection); None
        without a fallback (the transform's centre crop)."""
        path = os.path.abspath(path)
        box = self.boxes.get(path)
        if box is None and self.fallback is not None and size is None and path not in self.sizes:
            raise ValueError(f"{path}: no face box or image size recorded for the typical face square (find_faces)")
        size = size or self.sizes.get(path)
        if box is None and self.fallback is not None and size is not None:
            box = typical_box(self.fallback, *size)
        return None if box is None else square_box(box, self.margin)

    def crop(self, image: torch.Tensor, path):
        """The crop square (`region`) of `image`, decoded from `path`, or None: a picture of what the run crops
        (the contact sheets of faces.py and audit.py; training and inference crop `regions` in the transform)."""
        region = self.region(path, tuple(image.shape[-2:]))
        return None if region is None else crop_region(image, *region)

    def regions(self, paths) -> list:
        """The crop square of each of `paths` (`region`), in their order: a dataset's column."""
        return [self.region(path) for path in map(str, paths)]

    def missing(self) -> list:
        """The images where no face was found (absolute paths)."""
        return sorted(path for path, box in self.boxes.items() if box is None)

    def subset(self, paths) -> "FaceCrop":
        """The same crop for `paths` only (the images a run keeps)."""
        paths = [os.path.abspath(p) for p in map(str, paths)]
        return FaceCrop({p: self.boxes.get(p) for p in paths}, self.margin, self.settings, self.fallback,
                        {p: self.sizes.get(p) for p in paths})


class DetectFiles(Dataset):
    """Item i: (i, the chosen box of image i or None, its (height, width)) for a DataLoader's workers."""

    def __init__(self, paths, detector):
        self.paths, self.detector = paths, detector

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index):
        try:
            image = decode_image(self.paths[index])
        except ValueError:  # unreadable: the image check names it
            return index, None, None
        rgb = image.permute(1, 2, 0).numpy()
        return index, choose_face(self.detector.detect(rgb), *rgb.shape[:2]), rgb.shape[:2]


def check_face_settings(margin=DEFAULT_MARGIN, score=DEFAULT_SCORE, detector=None) -> None:
    """The face crop's margin, the detector's score threshold and (given) its file, checked: the one place
    (flags.py, find_faces and YuNet call it)."""
    if not MARGIN_RANGE[0] <= margin <= MARGIN_RANGE[1]:
        raise FaceDetectorError(f"--face_margin must be in [{MARGIN_RANGE[0]}, {MARGIN_RANGE[1]}], got {margin}")
    if not 0 < score < 1:
        raise FaceDetectorError(f"--face_score must be in (0, 1), got {score}")
    if detector is not None and not Path(detector).is_file():
        raise FaceDetectorError(f"--face_detector: file not found: {detector} (YuNet's ONNX file from the OpenCV "
                                "model zoo, models/face_detection_yunet/)")


def detector_settings(detector_path, score) -> dict:
    """What the boxes depend on (recorded in config.json and keying the box cache)."""
    path = Path(detector_path)
    return dict(detector="yunet", detector_file=str(path), detector_stamp=file_stamp(path) if path.is_file() else "",
                score=float(score), version=FACES_VERSION)


def find_faces(paths, detector_path=DEFAULT_DETECTOR, score=DEFAULT_SCORE, margin=DEFAULT_MARGIN,
               cache_dir=DEFAULT_CACHE_DIR, num_workers=0, detector=None, fallback="typical") -> FaceCrop:
    """The FaceCrop of `paths`: boxes found once and kept in `cache_dir` (a CSV per detector setting), so
    that a second run, an ensemble member or inference on the same files detects nothing again.
    `detector`: any object with `detect(rgb) -> (n, 5)` (tests inject one); by default YuNet.
    `fallback`: where images without a face are cropped: "typical" (the typical face of `paths`: a
    training set), a run's recorded typical face, or None (the centre crop)."""
    check_face_settings(margin, score)
    settings = detector_settings(detector_path, score)
    if detector is None:
        detector = YuNet(detector_path, score)
    else:
        settings["detector"] = type(detector).__name__
    key = hashlib.sha1(json.dumps({k: v for k, v in settings.items() if k != "detector_file"},
                                  sort_keys=True).encode()).hexdigest()[:16]
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    record = cache_dir / f"faces-{key}.csv"
    wanted = {os.path.abspath(p): file_stamp(p) for p in map(str, paths)}
    with locked(record.with_suffix(".lock")):
        known = read_boxes(record)
        todo = [path for path, stamp in wanted.items() if known.get(path, (None,))[0] != stamp]
        if todo:
            loader = DataLoader(DetectFiles(todo, detector), batch_size=None, num_workers=num_workers)
            for index, box, size in tqdm(loader, desc=f"finding faces in {len(todo)} images", total=len(todo),
                                         leave=False, dynamic_ncols=True):
                known[todo[index]] = (wanted[todo[index]], None if box is None else tuple(map(float, box)),
                                      None if size is None else tuple(map(int, size)))
            write_boxes(record, known)
    boxes = {path: known[path][1] for path in wanted}
    sizes = {path: known[path][2] for path in wanted}
    if fallback == "typical":
        fallback = typical_face(boxes, sizes)
    return FaceCrop(boxes, margin, settings, fallback, sizes)


BOX_COLUMNS = ["x", "y", "w", "h", "score"]


def read_boxes(record) -> dict:
    """path -> (stamp, box or None, (height, width) or None) from a box cache file (a damaged one is
    detected again)."""
    if not Path(record).is_file():
        return {}
    try:
        frame = pd.read_csv(record, dtype={"path": str, "stamp": str}, keep_default_na=True)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError):
        return {}
    if not {"path", "stamp", "height", "width", *BOX_COLUMNS} <= set(frame.columns):
        return {}
    return {row.path: (row.stamp, None if np.isnan(row.x) else tuple(float(getattr(row, c)) for c in BOX_COLUMNS),
                       None if np.isnan(row.height) else (int(row.height), int(row.width)))
            for row in frame.itertuples()}


def box_fields(box) -> dict:
    """x, y, w, h, score of a box (NaN where there is no face), as the CSV columns."""
    return dict(zip(BOX_COLUMNS, box or [np.nan] * 5, strict=True))


def write_boxes(path, boxes: dict) -> None:
    """Write path -> (stamp, box or None, (height, width) or None) as a CSV: path, stamp, x, y, w, h, score
    (empty: no face), height, width (empty: unreadable)."""
    rows = [dict(path=image, stamp=stamp, **box_fields(box), **dict(zip(("height", "width"), size or [np.nan] * 2,
                                                                       strict=True)))
            for image, (stamp, box, size) in boxes.items()]
    write_csv(path, pd.DataFrame(rows, columns=["path", "stamp", *BOX_COLUMNS, "height", "width"]))


def run_face_crop(spec, paths, face_detector=None, cache_dir=None, num_workers=0):
    """The face crop of a run (its spec.RunSpec) trained with --face_crop for `paths`, as it was trained: the
    same detector, score, margin and fallback (None for other runs). `face_detector`: where the file moved;
    `cache_dir`: where the boxes are kept (default: the run's own)."""
    face = spec.preprocess.face
    if face is None:
        return None
    detector = face_detector or face.detector
    if not face_detector and not Path(detector).is_file() and Path(detector).name == Path(DEFAULT_DETECTOR).name:
        detector = DEFAULT_DETECTOR  # the file this project ships, where the run recorded another copy of it
    if not Path(detector).is_file():
        raise FaceDetectorError(f"{spec.run_dir or 'the run'} was trained with --face_crop: its detector file "
                                f"{detector} is not here; pass --face_detector FILE")
    return find_faces(paths, detector, face.score, face.margin, cache_dir or spec.cache_dir or DEFAULT_CACHE_DIR,
                      num_workers, fallback=face.fallback)


def run_regions(spec, paths, face_detector=None, cache_dir=None, num_workers=0, no_face_path=None) -> list:
    """Each image's crop region for a run (its RunSpec), as it was trained: a --face_crop run's face squares
    (`run_face_crop`; the line of what was found printed, and with `no_face_path` the images without a face
    listed there), None for every image of other runs (their centre crop)."""
    faces = run_face_crop(spec, paths, face_detector, cache_dir, num_workers)
    if faces is None:
        return [None] * len(paths)
    listed = None
    if no_face_path:
        Path(no_face_path).parent.mkdir(parents=True, exist_ok=True)
        listed = write_no_face(no_face_path, faces)
    print(found_line(faces, listed))
    return faces.regions(paths)


def found_line(faces, listed=None) -> str:
    """"faces: found in N of M images (margin); K take the typical face square, listed in FILE": what the run
    header, inference and ensembling print."""
    missing = len(faces.missing())
    where = f", listed in {listed}" if missing and listed else ""
    return (f"faces: found in {len(faces.boxes) - missing:,} of {len(faces.boxes):,} images (margin {faces.margin}); "
            f"{missing:,} {no_face_words(faces.fallback)}{where}")


def record_words(record) -> str:
    """The same for a run's config.json record of its faces (`face_record`), for the report."""
    return (f"{record['images'] - record['no_face']:,} of {record['images']:,} images with a face (margin "
            f"{record['margin']}, score {record['score']}); {record['no_face']:,} "
            f"{no_face_words(record.get('fallback'))}.")


def add_face_flags(parser):
    """inference.py's and ensemble.py's --face_crop (a check: the runs must have been trained with it),
    --face_detector (where the file moved) and --cache_dir (the boxes)."""
    parser.add_argument("--face_crop", action="store_true",
                        help="check that the run crops faces (a run trained with --face_crop always does, as trained)")
    parser.add_argument("--face_detector", default=None,
                        help="the detector file, where it is not at the path the run recorded")
    parser.add_argument("--cache_dir", default=DEFAULT_CACHE_DIR, help="the image check and the face boxes")


def check_face_flags(args, specs) -> None:
    """--face_crop on a run (its RunSpec) trained without it is an error (the model never saw face crops)."""
    if args.face_crop:
        for spec in specs:
            if spec.preprocess.face is None:
                raise ValueError(f"--face_crop: {spec.run_dir} was trained without --face_crop, so it predicts on its "
                                 "own crop; retrain it with --face_crop or drop the flag")


def no_face_words(fallback) -> str:
    """What happens to an image without a face, for the run header, inference and the report."""
    return "keep the centre crop" if fallback is None else "take the typical face square"


def write_no_face(path, faces: FaceCrop) -> Path:
    """The images where no face was found, one per line (`no_face.csv`)."""
    write_csv(path, pd.DataFrame({"path": faces.missing()}))
    return Path(path)


def face_record(faces: FaceCrop) -> dict:
    """The face crop's settings and counts, as config.json keeps them."""
    return dict(faces.settings, images=len(faces.boxes), no_face=len(faces.missing()))


def contact_sheet(path, images, faces: FaceCrop, size=96, columns=12, limit=120) -> Path:
    """A PNG of the face crops of `images` (the first `limit`), images without a face (their typical
    face square or whole image) framed in red."""
    import torchvision.transforms.v2.functional as TF
    from PIL import Image, ImageDraw
    images = list(images)[:limit]
    rows = max(1, -(-len(images) // columns))
    sheet = Image.new("RGB", (columns * size, rows * size), "white")
    draw = ImageDraw.Draw(sheet)
    for i, image_path in enumerate(images):
        image = decode_image(image_path)
        crop = faces.crop(image, image_path)
        tile = TF.resize(crop if crop is not None else image, [size, size], antialias=True)
        x, y = i % columns * size, i // columns * size
        sheet.paste(Image.fromarray(tile.permute(1, 2, 0).numpy()), (x, y))
        if not faces.found(image_path):
            draw.rectangle([x, y, x + size - 1, y + size - 1], outline="red", width=3)
    atomic_write(path, lambda tmp: sheet.save(tmp, format="PNG"))
    return Path(path)


FACES_DOC = """Find the face of every image of a folder (recursively, hidden files skipped): boxes.csv, no_face.csv and
faces.png, a contact sheet of the crops train.py --face_crop would take.

examples:
  python faces.py sample_data/train/images         # the detector this project ships in weights/"""


def main(argv=None):
    parser = tool_parser(FACES_DOC)
    parser.add_argument("folder", help="a folder of images, e.g. a train folder's images/")
    parser.add_argument("--face_detector", default=DEFAULT_DETECTOR, help="YuNet's ONNX file")
    parser.add_argument("--face_score", type=float, default=DEFAULT_SCORE, help="the detector's score threshold")
    parser.add_argument("--face_margin", type=float, default=DEFAULT_MARGIN,
                        help="the crop's side over the face box's larger side")
    parser.add_argument("--cache_dir", default=DEFAULT_CACHE_DIR, help="where the boxes are kept for train.py")
    parser.add_argument("--num_workers", type=int, default=2, help="detection processes")
    parser.add_argument("--output_dir", default="faces", help="where boxes.csv, no_face.csv and faces.png go")
    args = parser.parse_args(argv)
    with one_line_errors(FaceDetectorError):
        folder = Path(args.folder)
        if not folder.is_dir():
            raise FaceDetectorError(f"folder not found: {folder}")
        paths = sorted(str(p) for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS
                       and p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts))
        if not paths:
            raise FaceDetectorError(f"no images in {folder}")
        faces = find_faces(paths, args.face_detector, args.face_score, args.face_margin, args.cache_dir,
                           args.num_workers)
        out = Path(args.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        rows = [dict(path=path, **box_fields(box)) for path, box in faces.boxes.items()]
        write_csv(out / "boxes.csv", pd.DataFrame(rows, columns=["path", *BOX_COLUMNS]))
        write_no_face(out / "no_face.csv", faces)
        sheet = contact_sheet(out / "faces.png", paths, faces)
    print(f"{len(paths) - len(faces.missing())} of {len(paths)} images have a face; wrote {out / 'boxes.csv'}, "
          f"{out / 'no_face.csv'} and {sheet}")
    return faces


if __name__ == "__main__":
    main()

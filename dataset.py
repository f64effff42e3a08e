"""Data layer: labels, the scan of a train folder into one table, splits and folds, datasets,
uint8 collate and the device prefetcher (augmentations: augment.py; generated sample data: sample.py)."""
import os
import re
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torchvision
import torchvision.transforms.v2.functional as TF
from PIL import Image, ImageFilter, ImageOps, UnidentifiedImageError
from torch.utils.data import Dataset, WeightedRandomSampler

from labels import (
    DEFAULT_AGE_BINS,
    MASK_FILES,
    AgeLabels,
    GenderLabels,
    MaskLabels,
    decode_multi_class,
    encode_multi_class,
)

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png"}
IMAGES_PER_PERSON = len(MASK_FILES)
PERSON_FOLDER = re.compile(r"^(\d+)_(male|female)_(.+?)_(\d+)$", re.IGNORECASE)  # a race may hold "_"
MAX_AGE = 120  # UTKFace's oldest is 116
SAMPLE_DIR = Path(__file__).resolve().parent / "sample_data"


def to_class_targets(targets: torch.Tensor) -> torch.Tensor:
    """Targets of any dataset kind ((N,) classes or (N, 3) heads) -> (N,) 18-class ids."""
    return targets if targets.ndim == 1 else encode_multi_class(targets[:, 0], targets[:, 1], targets[:, 2])


def to_head_targets(targets: torch.Tensor) -> torch.Tensor:
    """Targets of any dataset kind -> (N, 3) with columns mask, gender, age (and a 4th, the exact
    age, where the dataset gives it)."""
    return targets if targets.ndim == 2 else torch.stack(decode_multi_class(targets), dim=1)


# ---------------------------------------------------------------- the scan
def images_dir(data_dir) -> Path:
    """Accept the train folder (holding images/ and train.csv) or its images/ folder."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise FileNotFoundError(f"data folder not found: {data_dir}")
    return data_dir / "images" if (data_dir / "images").is_dir() else data_dir


def check_image(path: Path) -> None:
    """A cheap check (header only) that a file is a readable image; raises naming the file."""
    try:
        Image.open(path).close()  # parses the header only
    except (UnidentifiedImageError, OSError) as error:
        raise ValueError(f"unreadable image {path}: {error}") from None


def read_csv_file(path, what, **kwargs) -> pd.DataFrame:
    """`pd.read_csv`, where an empty, unparsable or non-text file is an error naming it and `what` it should be."""
    try:
        return pd.read_csv(path, **kwargs)
    except ValueError as error:  # pandas' EmptyDataError and ParserError, a UnicodeDecodeError
        raise ValueError(f"{path}: not {what} ({str(error).splitlines()[0]})") from None


class DataWarning(UserWarning):
    """Something in a data folder was skipped or is incomplete (the run goes on without it)."""


def _is_hidden(name: str) -> bool:
    """Hidden files and folders (`.*`, `._*` from macOS, `.ipynb_checkpoints`) and `__MACOSX`."""
    return name.startswith(".") or name == "__MACOSX"


def scan_people(data_dir, age_bins=DEFAULT_AGE_BINS, relabel=None, check_images=True,
                expect_complete=True) -> pd.DataFrame:
    """Scan `train/images/<id>_<gender>_<race>_<age>/<mask file>` into one table, a row per image.

    Columns: path, person, id, gender, race, age, mask, gender_label, age_label, class.
    Bad folder names, unknown files and (where `expect_complete`) people with fewer than 7 images are
    warned about by name; a relabel CSV (see `apply_relabel`) is applied here.
    """
    root = images_dir(data_dir)
    rows, bad_folders, unknown_files, duplicates, incomplete = [], [], [], [], []
    for folder in sorted(p for p in root.iterdir() if not _is_hidden(p.name)):
        if not folder.is_dir():
            unknown_files.append(folder.name)
            continue
        match = PERSON_FOLDER.match(folder.name.strip())
        if not match:
            bad_folders.append(folder.name)
            continue
        person_id, gender, race, age = match.groups()
        found = set()
        for file in sorted(p for p in folder.iterdir() if not _is_hidden(p.name)):
            if not file.is_file() or file.suffix.lower() not in IMAGE_EXTENSIONS or file.stem.lower() not in MASK_FILES:
                unknown_files.append(f"{folder.name}/{file.name}" + ("" if file.is_file() else "/"))
                continue
            if file.stem.lower() in found:
                duplicates.append(f"{folder.name}/{file.name}")
                continue
            if check_images:
                check_image(file)
            found.add(file.stem.lower())
            rows.append(dict(path=str(file), person=folder.name, id=person_id, gender=gender.lower(),
                             race=race, age=int(age), mask=MaskLabels.from_file_stem(file.stem).value))
        if expect_complete and len(found) < IMAGES_PER_PERSON:
            incomplete.append(f"{folder.name} ({len(found)} images)")
    for what, names in (("folder names that do not parse as <id>_<gender>_<race>_<age>", bad_folders),
                        ("unknown files", unknown_files),
                        ("second files for one image, e.g. mask1.jpg beside mask1.png (the first by name is used)",
                         duplicates),
                        ("people with fewer than 7 images", incomplete)):
        if names:
            warnings.warn(f"{root}: skipped or incomplete, {len(names)} {what}: {', '.join(names[:10])}"
                          + (" ..." if len(names) > 10 else ""), DataWarning, stacklevel=2)
    if not rows:
        raise ValueError(f"no usable images under {root}: expected <id>_<gender>_<race>_<age>/mask1.jpg ...")
    table = pd.DataFrame(rows)
    if relabel is not None:
        table = apply_relabel(table, relabel)
    warn_odd_people(table, root)  # after the relabel, which may fix an age
    return add_labels(table, age_bins)


def warn_odd_people(table: pd.DataFrame, root: Path) -> None:
    """Warn (naming them) about ages past any human's and ids that name more than one person folder."""
    people = table.drop_duplicates("person")
    too_old = people.loc[people["age"] > MAX_AGE, "person"]
    if len(too_old):
        warnings.warn(f"{root}: {len(too_old)} people older than {MAX_AGE}, a typo in the folder name? "
                      f"{', '.join(too_old[:10])}", DataWarning, stacklevel=3)
    pairs = shared_id_pairs(table)
    if pairs:
        warnings.warn(f"{root}: {len(pairs)} person folder(s) share an id with another, e.g. {pairs[0][0]} and "
                      f"{pairs[0][1]}: each group is kept on one side of any split, and a --relabel row with "
                      "the id changes them all", DataWarning, stacklevel=3)


def shared_id_pairs(table: pd.DataFrame) -> list:
    """(first, other) for each person folder whose id an earlier folder by name already has."""
    folders = table.drop_duplicates("person").groupby("id")["person"].agg(sorted)
    return [(group[0], other) for group in folders for other in group[1:]]


def add_labels(table: pd.DataFrame, age_bins=DEFAULT_AGE_BINS) -> pd.DataFrame:
    """(Re)compute the gender, age and class labels from the raw columns."""
    if not (0 < age_bins[0] < age_bins[1]):
        raise ValueError(f"age bins must be two increasing positive edges, got {age_bins}")
    table = table.copy()
    table["gender_label"] = table["gender"].map(lambda g: GenderLabels.from_str(g).value)
    table["age_label"] = table["age"].map(lambda age: AgeLabels.from_number(age, age_bins).value)
    table["class"] = encode_multi_class(table["mask"], table["gender_label"], table["age_label"])
    return table


def apply_relabel(table: pd.DataFrame, relabel_csv) -> pd.DataFrame:
    """Apply corrections: rows with `id` set `gender` and/or `age` of that person; rows with `path`
    (relative to images/, extension optional, e.g. `000020_female_Asian_50/normal`) set `mask`
    (0/1/2 or wear/incorrect/normal); a `drop` of yes/1/true leaves the row's person (`id`) or image
    (`path`) out. Blank cells change nothing. Prints what changed."""
    fixes = read_csv_file(relabel_csv, "a relabel CSV of id,gender,age,path,mask,drop", dtype=str).fillna("")
    for column in ("id", "gender", "age", "path", "mask", "drop"):
        if column not in fixes:
            fixes[column] = ""
    table = table.copy()
    changed = {"gender": 0, "age": 0, "mask": 0}
    dropped = pd.Series(False, index=table.index)
    mask_names = {"wear": 0, "mask": 0, "incorrect": 1, "normal": 2, "not wear": 2}
    keys = table["path"].map(lambda p: "/".join(Path(p).with_suffix("").parts[-2:]).lower())
    for row in fixes.itertuples():
        drop = row.drop.strip().lower()
        if drop not in ("", "0", "no", "false", "1", "yes", "true"):
            raise ValueError(f"{relabel_csv}: bad drop value {row.drop!r} (yes/1/true or no/0/false)")
        drop = drop in ("1", "yes", "true")
        if drop and not (row.id or row.path):
            raise ValueError(f"{relabel_csv}: a drop row needs an id (a person) or a path (an image)")
        if row.id:
            person = table["id"] == row.id
            if not person.any():
                raise ValueError(f"{relabel_csv}: person id {row.id} is not in the data")
            if drop:
                dropped |= person
            if row.gender:
                changed["gender"] += int(person.any() and (table.loc[person, "gender"] != row.gender.lower()).any())
                table.loc[person, "gender"] = GenderLabels.from_str(row.gender).name.lower()
            if row.age:
                age = int(float(row.age))
                changed["age"] += int((table.loc[person, "age"] != age).any())
                table.loc[person, "age"] = age
        if row.path and (row.mask or drop):
            image = keys == str(Path(row.path).with_suffix("")).lower().replace("\\", "/")
            if not image.any():
                raise ValueError(f"{relabel_csv}: image {row.path} is not in the data")
            if drop:
                dropped |= image
            if row.mask:
                mask = mask_names.get(row.mask.lower(), None) if not row.mask.isdigit() else int(row.mask)
                if mask not in (0, 1, 2):
                    raise ValueError(f"{relabel_csv}: bad mask value {row.mask!r} for {row.path}")
                changed["mask"] += int((table.loc[image, "mask"] != mask).any())
                table.loc[image, "mask"] = mask
    if dropped.all():
        raise ValueError(f"{relabel_csv}: its drop rows leave no image")
    people_dropped = int(dropped.groupby(table["id"]).all().sum())
    print(f"relabel {relabel_csv}: changed gender of {changed['gender']} people, age of {changed['age']} "
          f"people, mask of {changed['mask']} images"
          + (f"; left out {int(dropped.sum())} images ({people_dropped} whole people)" if dropped.any() else ""))
    return table[~dropped].reset_index(drop=True)


# ---------------------------------------------------------------- one photo under two ids
DUPLICATE_MIN = 0.85  # utkmask train + eval: 10 pairs of one photo at 0.86-0.99, other people at most 0.79
SIGNATURE_SIZE = 64


def open_upright(path) -> Image.Image:
    """A photo as PIL loaded and turned the way its EXIF orientation says (as a viewer shows it)."""
    with Image.open(path) as image:
        return ImageOps.exif_transpose(image)


def signature(path) -> np.ndarray:
    """A photo as a vector whose dot product with another's is the mean of two pixel correlations at
    SIGNATURE_SIZE^2 grayscale: of the images (the layout) and of their fine detail (the image less its
    blur), so a re-saved, re-cropped or slightly rotated copy scores high and two look-alike aligned faces
    do not (utkmask train + eval: ten copies 0.86-0.99; below them one woman in two photos, 0.79)."""
    gray = open_upright(path).convert("L").resize((SIGNATURE_SIZE, SIGNATURE_SIZE), Image.BILINEAR)
    blurred = gray.filter(ImageFilter.GaussianBlur(2))
    pixels = np.asarray(gray, np.float32).ravel()
    parts = [pixels, pixels - np.asarray(blurred, np.float32).ravel()]
    parts = [(part - part.mean()) / (np.linalg.norm(part - part.mean()) + 1e-6) for part in parts]
    return np.concatenate(parts) / np.sqrt(2)


def duplicate_pairs(table: pd.DataFrame, min_similarity=DUPLICATE_MIN, block=1024) -> list:
    """(first, other, similarity) for each pair of people whose `normal` photos (the unmasked face) match
    at least `min_similarity` (`signature`): the same picture under two ids, `first` before `other` by
    name. People without a readable `normal` photo are left out."""
    normal = table[table["path"].map(lambda p: Path(p).stem.lower() == "normal")].drop_duplicates("person")
    people, vectors = [], []
    for person, path in zip(normal["person"], normal["path"], strict=True):
        try:
            vectors.append(signature(path))
            people.append(person)
        except (OSError, ValueError):
            continue
    if len(vectors) < 2:
        return []
    vectors = np.stack(vectors)
    pairs = []
    for start in range(0, len(vectors), block):
        similar = vectors[start:start + block] @ vectors.T
        for i, j in zip(*np.nonzero(similar >= min_similarity), strict=True):
            if j > start + i:
                first, other = sorted((people[start + i], people[j]))
                pairs.append((first, other, float(similar[i, j])))
    return pairs


def keep_duplicates_together(side: pd.Series, table: pd.DataFrame) -> pd.Series:
    """`side` (each person's split or fold) with every group of people sharing one photo (`duplicate_pairs`)
    or one id (`shared_id_pairs`) moved to the side of its first person by name, so one face is never on
    both sides (a leak)."""
    photo_pairs = [(first, other) for first, other, _ in duplicate_pairs(table)]
    pairs = photo_pairs + shared_id_pairs(table)
    if not pairs:
        return side
    leader = {person: person for person in side.index}

    def find(person):
        while leader[person] != person:
            person = leader[person]
        return person
    for first, other in pairs:
        a, b = sorted((find(first), find(other)))
        leader[b] = a
    moved = pd.Series([side[find(person)] for person in side.index], index=side.index)
    first, other = pairs[0]
    what = (f"{len(photo_pairs)} pair(s) of people share one photo (e.g. {first} and {other}; audit.py lists them)"
            if photo_pairs else f"{len(pairs)} person folder(s) share an id (e.g. {first} and {other})")
    if moved.nunique() < side.nunique():  # too few people to keep them together and fill every side
        warnings.warn(f"{what}: kept apart, too few people to split otherwise", DataWarning, stacklevel=3)
        return side
    warnings.warn(f"{what}: each kept on one side of the split, {int((moved != side).sum())} person(s) moved",
                  DataWarning, stacklevel=3)
    return moved


# ---------------------------------------------------------------- splits
def person_table(table: pd.DataFrame) -> pd.DataFrame:
    """One row per person with the stratum used for splitting (gender x age class, 0..5)."""
    people = table.groupby("person", sort=True)[["gender_label", "age_label"]].first()
    people["stratum"] = people["gender_label"] * 3 + people["age_label"]
    return people


def split_people(table: pd.DataFrame, val_ratio: float, seed: int):
    """Split people into (train, val) names, stratified by gender x age, reproducible from `seed`; people
    sharing one photo stay on one side (`keep_duplicates_together`)."""
    people = person_table(table)
    rng = np.random.default_rng(seed)
    val = []
    for _, group in people.groupby("stratum"):
        names = rng.permutation(group.index.to_numpy())
        val.extend(names[: int(round(len(names) * val_ratio))])
    if not val and val_ratio > 0:
        val = [rng.choice(people.index.to_numpy())]
    in_val = pd.Series(people.index.isin(val), index=people.index)
    if val:
        in_val = keep_duplicates_together(in_val, table)
    return sorted(people.index[~in_val]), sorted(people.index[in_val])


def check_fold(n_folds, fold) -> None:
    """--n_folds (0: one split, or at least 2) and --fold (None: every fold), checked: the one place (flags.py
    calls it before any work)."""
    if n_folds == 1 or n_folds < 0:
        raise ValueError(f"--n_folds must be 0 (one split) or at least 2, got {n_folds}")
    if fold is not None and not (n_folds >= 2 and 0 <= fold < n_folds):
        raise ValueError(f"--fold {fold} needs 0 <= fold < --n_folds ({n_folds})")


def fold_people(table: pd.DataFrame, n_folds: int, fold: int, seed: int):
    """Stratified K-fold over people: returns (train, val) names for `fold`; every person is in
    exactly one validation fold, people sharing one photo in the same one."""
    from sklearn.model_selection import StratifiedKFold
    check_fold(n_folds, fold)
    people = person_table(table)
    if len(people) < n_folds:
        raise ValueError(f"{n_folds} folds need at least {n_folds} people, found {len(people)}")
    if people["stratum"].value_counts().max() >= n_folds:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            splits = list(StratifiedKFold(n_folds, shuffle=True, random_state=seed)
                          .split(people.index, people["stratum"]))
        fold_of = pd.Series(0, index=people.index)
        for k, (_, val) in enumerate(splits):
            fold_of.iloc[val] = k
    else:  # every stratum has fewer people than folds (scikit-learn refuses): deal them round the folds
        rng = np.random.default_rng(seed)
        dealt = [name for _, group in people.groupby("stratum") for name in rng.permutation(group.index.to_numpy())]
        fold_of = pd.Series(np.arange(len(dealt)) % n_folds, index=dealt).reindex(people.index)
    fold_of = keep_duplicates_together(fold_of, table)
    return sorted(people.index[fold_of != fold]), sorted(people.index[fold_of == fold])


# ---------------------------------------------------------------- datasets
def decode_image(path) -> torch.Tensor:
    """Read and decode an image file (JPEG or PNG, any mode, 16-bit PNGs scaled down) to a uint8 RGB
    CHW tensor turned the way its EXIF orientation says (as a viewer shows the photo); an unreadable file
    raises naming it."""
    try:
        with warnings.catch_warnings():  # torchvision 0.29 deprecates its (working) decoders for torchcodec
            warnings.simplefilter("ignore", DeprecationWarning)
            image = torchvision.io.decode_image(torchvision.io.read_file(str(path)),
                                                mode=torchvision.io.ImageReadMode.RGB, apply_exif_orientation=True)
    except (RuntimeError, OSError) as error:
        raise ValueError(f"unreadable image {path}: {without_source_locations(str(error).splitlines()[0])}") from None
    return image if image.dtype == torch.uint8 else TF.to_dtype(image, torch.uint8, scale=True)


def without_source_locations(text: str) -> str:
    """`text` without a library's source file locations (torchvision's `/__w/vision/.../decode_jpeg.cpp:171,`)."""
    return " ".join(re.sub(r"\s*[^\s,]*\.(?:cpp|cc|cu|h|hpp):\d+,?", "", text).split())


def load_image(path, transform=None, region=None) -> torch.Tensor:
    """Decode an image and apply `transform(image, region)` (uint8 CHW in, uint8 CHW out; `region`: the
    image's own crop square, e.g. around its face, or None: the transform's centre crop)."""
    image = decode_image(path)
    return transform(image, region) if transform else image


class MaskBaseDataset(Dataset):
    """All train images with 18-class targets. Its `split_dataset` splits by *image*, as the
    competition baseline did: one person's 7 images land on both sides, so validation scores are
    optimistic (a leak). Use `MaskSplitByProfileDataset` or `MultiLabelDataset` for honest scores."""
    num_classes = 18
    multi_label = False

    def __init__(self, data_dir=SAMPLE_DIR / "train", val_ratio=0.2, seed=42, n_folds=0, fold=0,
                 age_bins=DEFAULT_AGE_BINS, drop_ages=(), relabel=None, table=None, check_images=True,
                 extra_table=None, exact_age=False):
        table = table if table is not None else scan_people(data_dir, age_bins, relabel, check_images)
        self.real = table.reset_index(drop=True)  # the people that splits and folds are drawn from
        self.table = pd.concat([self.real, extra_table], ignore_index=True) if extra_table is not None else self.real
        self.val_ratio, self.seed, self.n_folds, self.fold = val_ratio, seed, n_folds, fold
        self.drop_ages = set(int(a) for a in drop_ages)
        self.transform = None
        self.cache = None  # an optional cache.DecodedCache of every row's prepared image
        self.paths = self.table["path"].tolist()
        # each image's crop square (top, left, side), e.g. around its face, or None (the centre crop)
        self.regions = self.table["region"].tolist() if "region" in self.table else [None] * len(self.table)
        self.class_targets = self.table["class"].to_numpy()
        # multi-label targets: (mask, gender, age group), and the exact age with `exact_age` (soft age targets)
        self.head_targets = self.table[["mask", "gender_label", "age_label"] + ["age"] * exact_age].to_numpy()

    def __len__(self):
        return len(self.table)

    def get_target(self, index):
        if self.multi_label:
            return tuple(int(v) for v in self.head_targets[index])
        return int(self.class_targets[index])

    def targets(self, kind="class"):
        """Per-image labels of one kind ('class', 'mask', 'gender_label', 'age_label')."""
        return self.table[kind].to_numpy()

    def image(self, index, transform=None) -> torch.Tensor:
        """Image `index` through `transform`, read from the decoded cache when there is one."""
        if self.cache is not None and transform is not None:
            return transform.from_prepared(self.cache[index])
        return load_image(self.paths[index], transform, self.regions[index])

    def __getitem__(self, index):
        return self.image(index, self.transform), self.get_target(index)

    def split_indices(self):
        """(train, val) image indices."""
        if self.n_folds and self.n_folds > 1:
            return self._indices_of_people(*fold_people(self.real, self.n_folds, self.fold, self.seed))
        rng = np.random.default_rng(self.seed)
        order = rng.permutation(len(self.real))
        n_val = int(len(order) * self.val_ratio)
        return self._drop(np.sort(order[n_val:])), np.sort(order[:n_val])

    def _indices_of_people(self, train_people, val_people):
        person = self.real["person"]
        return (self._drop(np.flatnonzero(person.isin(train_people).to_numpy())),
                np.flatnonzero(person.isin(val_people).to_numpy()))

    def _drop(self, train_indices):
        """Leave the `drop_ages` people out of training only; validation keeps everyone."""
        if not self.drop_ages:
            return train_indices
        keep = ~self.real["age"].iloc[train_indices].isin(self.drop_ages).to_numpy()
        return train_indices[keep]

    def split_dataset(self, train_transform=None, val_transform=None):
        """(train, val) subsets, each with its own transform; extra (synthetic) people only train."""
        train, val = self.split_indices()
        train = np.concatenate([train, np.arange(len(self.real), len(self.table))]).astype(int)
        return Subset(self, train, train_transform), Subset(self, val, val_transform)


class MaskSplitByProfileDataset(MaskBaseDataset):
    """18-class targets, split by person, stratified by the person's gender x age class (no leak)."""

    def split_indices(self):
        if self.n_folds and self.n_folds > 1:
            return super().split_indices()
        return self._indices_of_people(*split_people(self.real, self.val_ratio, self.seed))


class MultiLabelDataset(MaskSplitByProfileDataset):
    """Targets (mask, gender, age), split by person like `MaskSplitByProfileDataset`."""
    multi_label = True


DATASETS = {cls.__name__: cls for cls in (MaskBaseDataset, MaskSplitByProfileDataset, MultiLabelDataset)}


class Subset(Dataset):
    """Indices into a dataset with a transform of their own."""

    def __init__(self, dataset, indices, transform=None):
        self.dataset, self.indices, self.transform = dataset, np.asarray(indices), transform

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        index = int(self.indices[i])
        return self.dataset.image(index, self.transform), self.dataset.get_target(index)

    def targets(self, kind="class"):
        return self.dataset.targets(kind)[self.indices]


class ImageFiles(Dataset):
    """Images by path, with a transform and each image's crop region (None: the transform's centre crop);
    the target is the position."""

    def __init__(self, paths, transform=None, regions=None):
        self.paths, self.transform = list(paths), transform
        self.regions = list(regions) if regions is not None else [None] * len(self.paths)

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index):
        return load_image(self.paths[index], self.transform, self.regions[index]), index


class TestDataset(ImageFiles):
    """Eval images in info.csv order; the target is the row index. Every listed image must exist."""
    __test__ = False  # not a pytest test class

    def __init__(self, data_dir=SAMPLE_DIR / "eval", transform=None):
        data_dir = Path(data_dir)
        info_path = data_dir / "info.csv"
        if not info_path.is_file():
            raise FileNotFoundError(f"eval folder has no info.csv: {info_path}")
        if info_path.stat().st_size == 0:
            raise ValueError(f"{info_path} is empty: expected a header ImageID,ans and a row per image")
        self.info = read_csv_file(info_path, "a CSV of ImageID,ans", dtype={"ImageID": str})  # 000123 stays text
        if "ImageID" not in self.info:
            raise ValueError(f"{info_path} has no ImageID column")
        if self.info.empty:
            raise ValueError(f"{info_path} lists no images")
        if self.info["ImageID"].isna().any():
            raise ValueError(f"{info_path}: row {int(self.info['ImageID'].isna().to_numpy().argmax()) + 2} has "
                             "no ImageID")
        paths = [str(data_dir / "images" / image_id) for image_id in self.info["ImageID"]]
        missing = [p for p in paths if not os.path.isfile(p)]
        if missing:
            raise FileNotFoundError(f"{len(missing)} images listed in {info_path} are missing, e.g. "
                                    + ", ".join(missing[:3]) + why_missing(Path(missing[0])))
        super().__init__(paths, transform)


def why_missing(path: Path) -> str:
    """A hint on why an eval image listed in info.csv is not a file: a folder, spaces, the name's case."""
    if path.is_dir():
        return f" ({path.name} is a folder, not an image)"
    names = os.listdir(path.parent) if path.parent.is_dir() else []
    if path.name != path.name.strip() and path.name.strip() in names:
        return f" (the ImageID {path.name!r} has spaces at its ends)"
    near = [name for name in names if name.lower() == path.name.lower() and name != path.name]
    return f" (images/ has {near[0]}: the names differ in case)" if near else ""


def make_sampler(labels, seed=0) -> WeightedRandomSampler:
    """A class-balanced sampler: each image is drawn with weight 1 / (size of its class)."""
    labels = np.asarray(labels)
    counts = np.bincount(labels)
    weights = torch.as_tensor(1.0 / counts[labels], dtype=torch.double)
    return WeightedRandomSampler(weights, len(labels), replacement=True,
                                 generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- collate and prefetch
def fast_collate(batch):
    """Stack uint8 images without converting to float; targets become an int64 tensor,
    (N,) for classes or (N, 3) for (mask, gender, age)."""
    images = torch.stack([item[0] for item in batch])
    targets = torch.tensor([item[1] for item in batch], dtype=torch.int64)
    return images, targets


class PrefetchLoader:
    """Wraps a loader of uint8 batches: moves them to `device` (on CUDA: non-blocking, on a side
    stream of its own, one batch ahead) and normalises there to `dtype`. On CPU it yields the same
    normalised tensors through the same API. `augment` (optional) is applied to the [0, 1] batch before
    normalising, `erase` (timm's RandomErasing, training only) to the normalised one, as timm's loader
    does. With `mean` None the batches are moved as they are (train.py --cache_features' float features)."""

    def __init__(self, loader, mean, std, device=None, dtype=torch.float32, augment=None, erase=None):
        self.loader = loader
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.dtype = dtype
        self.normalise = mean is not None
        if self.normalise:
            self.mean = torch.tensor(mean, device=self.device).view(1, 3, 1, 1)
            self.std = torch.tensor(std, device=self.device).view(1, 3, 1, 1)
            self.scale, self.bias = 1 / (255 * self.std), -self.mean / self.std  # uint8 -> normalised in one pass
        self.augment, self.erase = augment, erase
        self.stream = torch.cuda.Stream(device=self.device) if self.device.type == "cuda" else None

    def __len__(self):
        return len(self.loader)

    @property
    def dataset(self):
        return self.loader.dataset

    @property
    def sampler(self):
        return self.loader.sampler

    def _prepare(self, images, targets):
        images = images.to(self.device, non_blocking=True)
        targets = targets.to(self.device, non_blocking=True)
        if not self.normalise:
            return images, targets
        if self.augment is None:
            images = images.float().mul_(self.scale).add_(self.bias)
        else:
            images = self.augment(images.float().div_(255)).sub(self.mean).div_(self.std)
        if self.erase is not None:
            images = self.erase(images)
        return images.to(self.dtype), targets

    def __iter__(self):
        if self.stream is None:
            for images, targets in self.loader:
                yield self._prepare(images, targets)
            return
        pending = None
        self.stream.wait_stream(torch.cuda.current_stream(self.device))  # the scale and bias it computed
        for images, targets in self.loader:
            with torch.cuda.stream(self.stream):
                ready = self._prepare(images, targets)
            if pending is not None:
                yield pending
            torch.cuda.current_stream(self.device).wait_stream(self.stream)
            for tensor in ready:
                tensor.record_stream(torch.cuda.current_stream(self.device))
            pending = ready
        if pending is not None:
            yield pending

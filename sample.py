"""Write a learnable sample in the competition layout into a new or empty folder: drawn faces whose labels
can be seen (skin tone: age group, hair: gender, a blue band or a red mouth: mask state), every person
with a look of their own (background, face place and size, eyes, hair, clothes) so that no two people
share a photo to the duplicate check (`dataset.duplicate_pairs`). Tests and benchmarks use it; no real
face is needed. The bundled `sample_data/` (made by an earlier version of this generator) is never
rewritten by this command.

    python sample.py /tmp/sample60 --n_people 60          # -> /tmp/sample60/train, eval, eval_labels.csv
    python train.py --data_dir /tmp/sample60/train
"""
import argparse
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw, ImageFilter

from dataset import SAMPLE_DIR
from labels import MASK_FILES, GenderLabels, encode_multi_class

AGE_OF_GROUP = ((18, 29), (30, 59), (60, 80))
SKIN_OF_AGE = ((235, 205, 175), (185, 140, 100), (120, 85, 60))
MASK_COLOR = (60, 110, 220)


def person_look(rng, size=(512, 384)) -> dict:
    """What stays the same across one person's seven photos and sets people apart (`dataset.duplicate_pairs`
    compares people's `normal` photos in grayscale, so two people of one gender x age group must not share
    one layout): a backdrop (a shaded wall with shapes beside the face), the face's place and size, eyes,
    hair and clothes. None of it carries a label: backdrop and clothes are greyish and mid-bright (no skin
    tone, mask blue, mouth red, dark or white hair) and the face stays near the centre, as in the
    competition's photos."""
    height, width = size
    base = int(rng.integers(140, 215))
    angle, amplitude = rng.uniform(0, 2 * np.pi), rng.uniform(30, 60)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    ramp = ((xs / width - 0.5) * np.cos(angle) + (ys / height - 0.5) * np.sin(angle)) * amplitude
    wall = base + rng.integers(-12, 13, 3).astype(np.float32) + ramp[..., None]
    backdrop = Image.fromarray(np.clip(wall, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(backdrop)
    for _ in range(int(rng.integers(5, 10))):
        level = int(np.clip(base + rng.choice((-1, 1)) * rng.integers(40, 90), 95, 205))
        fill = tuple(int(np.clip(level + t, 0, 255)) for t in rng.integers(-12, 13, 3))
        x = (rng.uniform(-0.1, 0.3) + rng.integers(2) * 0.8) * width  # left or right of the face, where it shows
        y = rng.uniform(-0.1, 1.1) * height
        rx, ry = rng.uniform(0.08, 0.3) * width, rng.uniform(0.08, 0.3) * height
        (draw.ellipse if rng.integers(2) else draw.rectangle)([x - rx, y - ry, x + rx, y + ry], fill=fill)
    return dict(
        backdrop=np.asarray(backdrop), cx=rng.uniform(-0.08, 0.08), cy=rng.uniform(-0.06, 0.06),
        fw=rng.uniform(0.24, 0.31), fh=rng.uniform(0.28, 0.35),
        eye_x=rng.uniform(0.3, 0.5), eye_y=rng.uniform(0.1, 0.3), eye_r=rng.uniform(0.6, 1.3),
        hair_shade=int(rng.integers(-15, 16)), hair_top=rng.uniform(0.5, 0.7), locks=rng.uniform(1.15, 1.35),
        lock_end=rng.uniform(0.6, 1.0), shoulders=rng.uniform(1.6, 2.6), neck=rng.uniform(0.7, 1.0),
        clothes=tuple(int(v) for v in np.clip(rng.integers(95, 200) + rng.integers(-12, 13, 3), 0, 255)))


def draw_face(mask, gender, age_group, size=(512, 384), rng=None, look=None) -> Image.Image:
    """A face drawing whose labels are visible: the skin tone gives the age group, the hair shape the
    gender (short block vs. long side locks), and the mask state a blue band over mouth and nose
    (wear), over the chin only (incorrect) or a red mouth (not wear). `look` (`person_look`, of this
    `size`) is the person's own backdrop, face place and features; without it one is drawn from `rng`.
    Each photo moves the face a little and changes the light."""
    rng = rng or np.random.default_rng()
    look = look or person_look(rng, size)
    height, width = size
    if look["backdrop"].shape[:2] != (height, width):
        raise ValueError(f"a look made for {look['backdrop'].shape[:2]} images drawn at size {size}")
    light = rng.integers(-6, 7, 3).astype(np.int16)
    image = Image.fromarray(np.clip(look["backdrop"] + light, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    cx = width * (0.5 + look["cx"] + rng.uniform(-0.015, 0.015))
    cy = height * (0.5 + look["cy"] + rng.uniform(-0.015, 0.015))
    fw, fh = width * look["fw"] * rng.uniform(0.97, 1.03), height * look["fh"] * rng.uniform(0.97, 1.03)
    draw.ellipse([cx - fw * look["shoulders"], cy + fh * look["neck"], cx + fw * look["shoulders"],
                  cy + fh * (look["neck"] + 2)], fill=look["clothes"])
    hair = tuple(int(np.clip(v + look["hair_shade"], 0, 255))
                 for v in ((40, 30, 20) if age_group < 2 else (225, 225, 225)))
    if gender == 1:
        draw.rectangle([cx - fw * look["locks"], cy - fh * 1.05, cx + fw * look["locks"], cy + fh * look["lock_end"]],
                       fill=hair)
    draw.ellipse([cx - fw, cy - fh, cx + fw, cy + fh], fill=SKIN_OF_AGE[age_group])
    if gender == 0:
        draw.rectangle([cx - fw * 0.9, cy - fh * 1.05, cx + fw * 0.9, cy - fh * look["hair_top"]], fill=hair)
    scale = min(height, width) / 384
    ex, ey = 8 * scale * look["eye_r"], 6 * scale * look["eye_r"]
    for side in (-1, 1):
        x, y = cx + side * fw * look["eye_x"], cy - fh * look["eye_y"]
        draw.ellipse([x - ex, y - ey, x + ex, y + ey], fill=(30, 30, 30))
    if mask == 2:
        draw.rectangle([cx - fw * 0.35, cy + fh * 0.45, cx + fw * 0.35, cy + fh * 0.55], fill=(200, 40, 40))
    else:
        top = cy + (fh * 0.02 if mask == 0 else fh * 0.62)
        draw.rectangle([cx - fw * 0.85, top, cx + fw * 0.85, cy + fh * 0.95], fill=MASK_COLOR)
        if mask == 1:
            draw.rectangle([cx - fw * 0.35, cy + fh * 0.4, cx + fw * 0.35, cy + fh * 0.5], fill=(200, 40, 40))
    noise = rng.normal(0, 6, (height, width, 3))
    array = np.clip(np.asarray(image, dtype=np.float32) + noise, 0, 255).astype(np.uint8)
    return Image.fromarray(array).filter(ImageFilter.GaussianBlur(1))


def make_sample(out_dir, n_people=24, seed=0, size=(512, 384), n_eval_people=6, quality=80, ext=".jpg"):
    """Write a learnable sample in the competition layout: `train/images/<person>/<mask file>`,
    `train/train.csv`, `eval/images/*.jpg`, `eval/info.csv` (ans 0) and `eval_labels.csv` (truth).
    People cycle through the six gender x age groups so every class appears. It writes where it is told
    (the command first refuses sample_data/ and folders that are not empty: `check_out_dir`)."""
    out_dir = Path(out_dir)
    rng = np.random.default_rng(seed)
    files = list(MASK_FILES.items())
    people, eval_rows = [], []
    for split, count in (("train", n_people), ("eval", n_eval_people)):
        (out_dir / split / "images").mkdir(parents=True, exist_ok=True)
        for i in range(count):
            gender, age_group = (i % 6) // 3, i % 3
            age = int(rng.integers(*AGE_OF_GROUP[age_group], endpoint=True))
            person_id = f"{i + (0 if split == 'train' else 900000):06d}"
            name = f"{person_id}_{GenderLabels(gender).name.lower()}_Asian_{age}"
            look = person_look(np.random.default_rng(rng.integers(1 << 63)), size)
            for stem, mask in files:
                image = draw_face(mask, gender, age_group, size, rng, look)
                if split == "train":
                    (out_dir / split / "images" / name).mkdir(exist_ok=True)
                    image.save(out_dir / split / "images" / name / f"{stem}{ext}", quality=quality)
                else:
                    image_id = f"{rng.integers(1 << 40):010x}.jpg"
                    image.save(out_dir / split / "images" / image_id, quality=quality)
                    eval_rows.append(dict(ImageID=image_id, ans=int(encode_multi_class(mask, gender, age_group))))
            if split == "train":
                people.append(dict(id=person_id, gender=GenderLabels(gender).name.lower(), race="Asian",
                                   age=age, path=name))
    pd.DataFrame(people).to_csv(out_dir / "train" / "train.csv", index=False)
    labels = pd.DataFrame(eval_rows, columns=["ImageID", "ans"])
    labels.to_csv(out_dir / "eval_labels.csv", index=False)
    labels.assign(ans=0).to_csv(out_dir / "eval" / "info.csv", index=False)
    return out_dir


def check_out_dir(out_dir) -> Path:
    """`out_dir` resolved, or a ValueError where the command must not write there: the bundled
    `sample_data/` (or a folder in it), a file, or a folder that is not empty (a second sample written over
    a first one mixes them: its eval images add to the old ones)."""
    out = Path(out_dir).expanduser().resolve()
    if out == SAMPLE_DIR or SAMPLE_DIR in out.parents:
        where = "is" if out == SAMPLE_DIR else f"is inside {SAMPLE_DIR},"
        raise ValueError(f"{out} {where} the bundled sample, which this command never rewrites: pass a new "
                         f"or empty folder, e.g. python sample.py /tmp/sample")
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} is a file, not a folder: pass a new or empty folder")
    if out.is_dir() and any(out.iterdir()):
        raise ValueError(f"{out} is not empty: pass a new or empty folder (a sample written over another "
                         f"one mixes the two)")
    return out


def main(argv=None) -> Path:
    description, _, examples = __doc__.strip().partition("\n\n")
    parser = argparse.ArgumentParser(description=description, epilog=examples,
                                     formatter_class=HelpFormatter, allow_abbrev=False)
    parser.add_argument("out_dir", metavar="OUT_DIR",
                        help="the folder to write: new or empty, not the bundled sample_data/")
    parser.add_argument("--n_people", type=int, default=24,
                        help="train people (they cycle through the six gender x age groups)")
    parser.add_argument("--n_eval_people", type=int, default=6,
                        help="eval people (7 images each, under random ImageIDs; truth in eval_labels.csv)")
    parser.add_argument("--size", type=int, nargs=2, default=[512, 384], metavar=("H", "W"),
                        help="image height and width in pixels")
    parser.add_argument("--seed", type=int, default=0, help="the random seed: the same seed writes the same sample")
    args = parser.parse_args(argv)
    try:
        if args.n_people < 1 or args.n_eval_people < 0:
            raise ValueError(f"--n_people must be at least 1 and --n_eval_people at least 0, "
                             f"got {args.n_people} and {args.n_eval_people}")
        if min(args.size) < 16:
            raise ValueError(f"--size must be at least 16 16, got {args.size[0]} {args.size[1]}")
        out = check_out_dir(args.out_dir)
    except ValueError as error:
        raise SystemExit(f"error: {error}") from None
    make_sample(out, args.n_people, args.seed, tuple(args.size), args.n_eval_people)
    print(f"wrote {out}: {args.n_people} train people, {args.n_eval_people} eval people")
    return out


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Every flag's default shown once; the epilog's examples keep their lines."""


if __name__ == "__main__":
    main()

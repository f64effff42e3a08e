"""A generator of learnable sample data in the competition layout: drawn faces whose labels can be seen
(skin tone: age group, hair: gender, a blue band or a red mouth: mask state). Tests, benchmarks and the
default folders (`sample_data/`) use it; no real face is needed.

    python sample.py OUT_DIR --n_people 60
"""
import argparse
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw, ImageFilter

from dataset import MASK_FILES, SAMPLE_DIR, GenderLabels, encode_multi_class

AGE_OF_GROUP = ((18, 29), (30, 59), (60, 80))
SKIN_OF_AGE = ((235, 205, 175), (185, 140, 100), (120, 85, 60))
MASK_COLOR = (60, 110, 220)


def draw_face(mask, gender, age_group, size=(512, 384), rng=None) -> Image.Image:
    """A face drawing whose labels are visible: the skin tone gives the age group, the hair shape the
    gender (short block vs. long side locks), and the mask state a blue band over mouth and nose
    (wear), over the chin only (incorrect) or a red mouth (not wear)."""
    rng = rng or np.random.default_rng()
    height, width = size
    background = tuple(int(v) for v in rng.integers(150, 230, 3))
    image = Image.new("RGB", (width, height), background)
    draw = ImageDraw.Draw(image)
    cx = width * (0.5 + rng.uniform(-0.03, 0.03))
    cy = height * (0.5 + rng.uniform(-0.03, 0.03))
    fw, fh = width * rng.uniform(0.26, 0.3), height * rng.uniform(0.3, 0.34)
    hair = (40, 30, 20) if age_group < 2 else (225, 225, 225)
    if gender == 1:
        draw.rectangle([cx - fw * 1.25, cy - fh * 1.05, cx + fw * 1.25, cy + fh * 0.9], fill=hair)
    draw.ellipse([cx - fw, cy - fh, cx + fw, cy + fh], fill=SKIN_OF_AGE[age_group])
    if gender == 0:
        draw.rectangle([cx - fw * 0.9, cy - fh * 1.05, cx + fw * 0.9, cy - fh * 0.6], fill=hair)
    for side in (-1, 1):
        draw.ellipse([cx + side * fw * 0.4 - 8, cy - fh * 0.2 - 6, cx + side * fw * 0.4 + 8, cy - fh * 0.2 + 6],
                     fill=(30, 30, 30))
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
    People cycle through the six gender x age groups so every class appears."""
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
            for stem, mask in files:
                image = draw_face(mask, gender, age_group, size, rng)
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


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Write a learnable sample in the competition layout.")
    parser.add_argument("out_dir", nargs="?", default=str(SAMPLE_DIR))
    parser.add_argument("--n_people", type=int, default=24)
    parser.add_argument("--n_eval_people", type=int, default=6)
    parser.add_argument("--size", type=int, nargs=2, default=(512, 384), metavar=("H", "W"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    make_sample(args.out_dir, args.n_people, args.seed, tuple(args.size), args.n_eval_people)
    print(f"wrote {args.out_dir}")

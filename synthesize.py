"""Write synthetic people for one age group by mixing two real people of the same gender and age
group, image by image (mask1 with mask1, ..., normal with normal), into a separate train-layout
folder that `train.py --extra_data DIR` adds to training (never to validation). The team did this
for the under-represented 60+ group.

examples:
    python synthesize.py --data_dir train --out_dir synthetic_old --age_group 2 --n_people 200
"""
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from dataset import open_upright, scan_people
from labels import DEFAULT_AGE_BINS
from runs import one_line_errors, tool_parser


def synthesize_people(data_dir, out_dir, age_group=2, n_people=100, seed=0, age_bins=DEFAULT_AGE_BINS,
                      blend=(0.35, 0.65), first_id=900000) -> pd.DataFrame:
    """Mix random same-gender pairs of `age_group` people (pixel blend with a weight drawn from
    `blend`); the new person's age is the pair's mean. Returns the written train.csv table."""
    if n_people < 1:
        raise ValueError(f"--n_people must be at least 1, got {n_people}")
    table = scan_people(data_dir, age_bins, check_images=False)
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"{out_dir} is not empty: choose a new --out_dir")
    group = table[table["age_label"] == age_group]
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n_people):
        gender = rng.choice(sorted(group["gender"].unique()))
        people = sorted(group.loc[group["gender"] == gender, "person"].unique())
        if len(people) < 2:
            raise ValueError(f"{data_dir}: fewer than two {gender} people in age group {age_group} to mix")
        first, second = rng.choice(people, 2, replace=False)
        a, b = (table[table["person"] == name].assign(stem=lambda t: t["path"].map(lambda p: Path(p).stem))
                .set_index("stem") for name in (first, second))
        age = int(round((a["age"].iloc[0] + b["age"].iloc[0]) / 2))
        name = f"{first_id + i:06d}_{gender}_{a['race'].iloc[0]}_{age}"
        weight = rng.uniform(*blend)
        (out_dir / "images" / name).mkdir(parents=True)
        for stem in sorted(set(a.index) & set(b.index)):
            image_a = open_upright(a.at[stem, "path"]).convert("RGB")
            image_b = open_upright(b.at[stem, "path"]).convert("RGB").resize(image_a.size)
            Image.blend(image_a, image_b, weight).save(out_dir / "images" / name / f"{stem}.jpg", quality=95)
        rows.append(dict(id=name.split("_")[0], gender=gender, race=a["race"].iloc[0], age=age, path=name,
                         mixed_from=f"{first}+{second}"))
    people = pd.DataFrame(rows)
    people.to_csv(out_dir / "train.csv", index=False)
    return people


def main(argv=None):
    parser = tool_parser(__doc__)
    parser.add_argument("--data_dir", required=True, help="the real train folder")
    parser.add_argument("--out_dir", required=True, help="a new folder for the synthetic people")
    parser.add_argument("--age_group", type=int, default=2, choices=[0, 1, 2], help="0 <30, 1 30-59, 2 >=60")
    parser.add_argument("--n_people", type=int, default=100, help="synthetic people to write")
    parser.add_argument("--age_bins", type=int, nargs=2, default=list(DEFAULT_AGE_BINS), metavar=("MIDDLE", "OLD"),
                        help="the first age of the middle and of the old group")
    parser.add_argument("--seed", type=int, default=0, help="which pairs are mixed")
    args = parser.parse_args(argv)
    with one_line_errors():
        people = synthesize_people(args.data_dir, args.out_dir, args.age_group, args.n_people, args.seed,
                                   tuple(args.age_bins))
    print(f"wrote {len(people)} synthetic people to {args.out_dir}; train with --extra_data {args.out_dir}")


if __name__ == "__main__":
    main()

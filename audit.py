"""Find likely label errors in a train folder from out-of-fold predictions: gender and age judged per
person (their images pooled), mask wear per image, a swapped `incorrect_mask` / `normal` pair as one
suspect; and people whose unmasked photos are the same picture (one person under two ids, often with
two different labels). Writes a ranked `audit.csv`, a `relabel_draft.csv` that `train.py --relabel`
reads, and `audit.png`, a contact sheet of the top suspects.

examples:
    python train.py --n_folds 5 --name cv ...        # every person validated once
    python audit.py model/cv_cv.json                  # -> audit/audit.csv, relabel_draft.csv, audit.png
    python train.py --relabel audit/relabel_draft.csv ...   # after looking and editing
"""
from pathlib import Path

import numpy as np
import pandas as pd
from cleanlab.filter import find_label_issues
from PIL import Image, ImageDraw
from scipy.special import ndtr

from dataset import DUPLICATE_MIN, decode_image, duplicate_pairs, images_dir, open_upright, scan_people
from faces import run_face_crop
from labels import DEFAULT_AGE_BINS, MASK_FILES, decode_multi_class
from runs import (
    HEAD_COLUMNS,
    atomic_write,
    checked_config,
    one_line_errors,
    read_folds,
    read_json,
    read_probabilities,
    run_command,
    tool_parser,
    write_csv,
)
from spec import RunSpec

GENDERS, AGE_GROUPS, MASKS = ("male", "female"), ("<30", "30-59", ">=60"), ("wear", "incorrect", "normal")
RELABEL_COLUMNS = ["id", "gender", "age", "path", "mask"]
KINDS = ("gender", "age", "mask", "mask swap")
DROP_KINDS = (*KINDS, "duplicate")  # --drop duplicate: the first person of each pair left out, the other kept
MIN_SCORE = 0.9  # the draft's threshold for every kind not given one
DRAFT_KINDS = ("gender", "mask swap", "mask")  # age moves to a neighbouring group are mostly the model's own errors


def probability_files(inputs) -> tuple:
    """(val_probs.csv paths, the train folder and run settings they came from) of run folders,
    `<name>_cv.json` files or probability files; runs from different train folders are an error."""
    files, specs = [], []
    for item in map(Path, inputs):
        if item.suffix == ".json" and item.is_file():
            folders = read_folds(item)
        elif item.is_dir():
            folders = [item]
        elif item.is_file():
            files.append(item)
            continue
        else:
            raise FileNotFoundError(f"input not found: {item}")
        for folder in folders:
            if not (folder / "val_probs.csv").is_file():
                raise FileNotFoundError(f"{folder} has no val_probs.csv: audit needs finished runs with validation "
                                        "(--n_folds), not --val_ratio 0")
            files.append(folder / "val_probs.csv")
            specs.append(RunSpec.of(checked_config(read_json(folder / "config.json"), folder)))
    roots = {str(images_dir(spec.data_dir).resolve()) for spec in specs}
    if len(roots) > 1:
        raise ValueError(f"the runs come from different train folders: {', '.join(sorted(roots))}")
    return files, specs


def out_of_fold(files) -> pd.DataFrame:
    """One row per image (ImageID = person/file): the given 18-class label, the per-head
    probabilities and, where every file has them, the years head's ages (`age_years`), averaged
    where several files hold the same image (seeds)."""
    frames = []
    for path in files:
        frame = read_probabilities(path)
        missing = {"ans", *HEAD_COLUMNS} - set(frame)
        if missing:
            raise ValueError(f"{path}: needs the ans and per-head columns of train.py's val_probs.csv "
                             f"(missing {', '.join(sorted(missing))})")
        frames.append(frame)
    columns = HEAD_COLUMNS + ["age_years"] * all("age_years" in f for f in frames)
    frame = pd.concat([f[["ImageID", "ans", *columns]] for f in frames], ignore_index=True)
    return frame.groupby("ImageID", sort=True).agg({"ans": "first", **{c: "mean" for c in columns}})


def audit_table(data_dir, age_bins=DEFAULT_AGE_BINS, relabel=None) -> pd.DataFrame:
    """The train folder's images, keyed by ImageID (person/file) as val_probs.csv writes them."""
    table = scan_people(data_dir, tuple(age_bins), relabel, check_images=False)
    root = images_dir(data_dir)
    table["ImageID"] = [str(Path(p).relative_to(root)) for p in table["path"]]
    return table.set_index("ImageID")


def join(table, probs) -> pd.DataFrame:
    """The train table with its out-of-fold probabilities; every image must have them."""
    extra = probs.index.difference(table.index)
    if len(extra):
        raise ValueError(f"{len(extra)} images of the probability files are not in the train folder, "
                         f"e.g. {extra[0]}: were they made from another folder?")
    missing = table.index.difference(probs.index)
    if len(missing):
        raise ValueError(f"the probability files cover {len(table) - len(missing)} of {len(table)} images: "
                         f"{len(missing)} have no out-of-fold prediction, e.g. {missing[0]} (train with --n_folds "
                         "and pass every fold)")
    return table.join(probs)


def ranked_issues(labels, probs):
    """(flagged indices, score = 1 - probability of the given label, suggested label) by cleanlab's
    confident learning."""
    labels = np.asarray(labels)
    probs = probs / probs.sum(1, keepdims=True)
    flagged = find_label_issues(labels, probs, min_examples_per_class=0) if len(set(labels)) > 1 else \
        np.zeros(len(labels), dtype=bool)
    return np.flatnonzero(flagged), 1 - probs[np.arange(len(labels)), labels], probs.argmax(1)


def nearest_age(age, group, bins) -> int:
    """The age in `group` closest to `age` (the smallest change that moves a person there)."""
    low, high = ((0, bins[0] - 1), (bins[0], bins[1] - 1), (bins[1], 200))[group]
    return int(min(max(age, low), high))


def unusual_within_group(labels, given_probs) -> np.ndarray:
    """1 - Phi(z), z = the log-odds of each person's given label standardised among the people given the
    same label: an age group that is hard to tell from both neighbours (30-59) does not crowd out the
    others' suspects (age moves found in the top K on five audits: +0.04 on average, never fewer)."""
    log_odds = np.log(given_probs + 1e-9) - np.log1p(-given_probs + 1e-9)
    z = np.zeros(len(labels))
    for label in np.unique(labels):
        group = labels == label
        z[group] = (log_odds[group] - log_odds[group].mean()) / (log_odds[group].std() + 1e-9)
    return 1 - ndtr(z)


def person_suspects(data, head, bins) -> list:
    """Gender or age suspects, one per person: the person's images' probabilities pooled (an age
    suspect's score is `unusual_within_group`). An age suspect's suggested age is the one in the
    suggested group nearest to the years head's predicted age where the runs have it (--age_years),
    else to the given age."""
    columns = [c for c in HEAD_COLUMNS if c.startswith(f"{head}_")]
    years = {"years": ("age_years", "mean")} if head == "age" and "age_years" in data else {}
    people = data.groupby("person").agg(id=("id", "first"), age=("age", "first"), label=(f"{head}_label", "first"),
                                        **years, **{c: (c, "mean") for c in columns})
    flagged, scores, suggested = ranked_issues(people["label"].to_numpy(), people[columns].to_numpy())
    if head == "age":
        scores = unusual_within_group(people["label"].to_numpy(), 1 - scores)
    names = GENDERS if head == "gender" else AGE_GROUPS
    rows = []
    for i in flagged:
        person = people.iloc[i]
        row = dict(kind=head, person=people.index[i], id=person["id"], path="", given=names[person["label"]],
                   suggested=names[suggested[i]], score=float(scores[i]))
        if head == "gender":
            row["relabel"] = dict(id=person["id"], gender=GENDERS[suggested[i]])
        else:
            guess = round(person["years"]) if years else person["age"]  # the years head's age, where there is one
            row["relabel"] = dict(id=person["id"], age=nearest_age(guess, suggested[i], bins))
            row["suggested"] += f" (age {row['relabel']['age']})"
        rows.append(row)
    return rows


def mask_suspects(data) -> list:
    """Mask suspects per image (cleanlab's flags); a person whose incorrect_mask and normal images each
    look most like the other is one `mask swap`, judged on the pair itself: cleanlab's per-class
    thresholds move with the model's confidence on every other image and missed a third of the swaps
    of a more confident model (benchmarks/results/bench_audit_160.md)."""
    columns = [f"mask_p{i}" for i in range(3)]
    flagged, scores, suggested = ranked_issues(data["mask"].to_numpy(), data[columns].to_numpy())
    stems = data["path"].map(lambda p: Path(p).stem.lower())
    rows, swapped = [], set()
    position = {image: i for i, image in enumerate(data.index)}
    for person, group in data.groupby("person"):
        pair = {stems[image]: image for image in group.index if stems[image] in ("incorrect_mask", "normal")}
        if len(pair) == 2 and suggested[position[pair["incorrect_mask"]]] == 2 \
                and suggested[position[pair["normal"]]] == 1:
            score = float(np.mean([scores[position[image]] for image in pair.values()]))
            rows.append(dict(kind="mask swap", person=person, id=data.loc[pair["normal"], "id"], path="",
                             given="incorrect_mask / normal", suggested="swapped", score=score,
                             relabel=[dict(path=relabel_path(pair["incorrect_mask"]), mask="normal"),
                                      dict(path=relabel_path(pair["normal"]), mask="incorrect")]))
            swapped.update(pair.values())
    for image, i in ((data.index[i], i) for i in flagged):
        if image not in swapped:
            rows.append(dict(kind="mask", person=data.loc[image, "person"], id=data.loc[image, "id"], path=image,
                             given=MASKS[data.loc[image, "mask"]], suggested=MASKS[suggested[i]],
                             score=float(scores[i]),
                             relabel=dict(path=relabel_path(image), mask=MASKS[suggested[i]])))
    return rows


def duplicate_suspects(data, min_similarity=DUPLICATE_MIN) -> list:
    """Pairs of people whose `normal` photos (the unmasked face) are one picture (`dataset.duplicate_pairs`).
    Such a pair often carries two labels (UTKFace: ages 93 and 85 on one photo); the split keeps it on one
    side. In the relabel draft only with `--drop duplicate` (the row's person left out, `other` kept);
    otherwise look and decide."""
    first_rows = data.drop_duplicates("person").set_index("person")
    rows = []
    for first, other, similarity in duplicate_pairs(data, min_similarity):
        a, b = first_rows.loc[first], first_rows.loc[other]
        rows.append(dict(kind="duplicate", person=first, id=a["id"], path="",
                         given=f"{GENDERS[a['gender_label']]} {a['age']}",
                         suggested=f"same photo as {b['id']} ({GENDERS[b['gender_label']]} {b['age']})",
                         score=similarity, relabel=dict(id=a["id"]), other=other))
    return rows


def relabel_path(image_id) -> str:
    """person/file.jpg -> person/file (the relabel CSV takes it without an extension)."""
    return str(Path(image_id).with_suffix(""))


def audit(data, bins, min_similarity=DUPLICATE_MIN) -> pd.DataFrame:
    """Every suspect, most likely first: kind, person, id, path, given, suggested, score, relabel, other
    (a duplicate's second person; its score is how well the two photos match, `signature`)."""
    rows = (person_suspects(data, "gender", bins) + person_suspects(data, "age", bins) + mask_suspects(data)
            + duplicate_suspects(data, min_similarity))
    frame = pd.DataFrame(rows, columns=["kind", "person", "id", "path", "given", "suggested", "score", "relabel",
                                        "other"])
    frame["other"] = frame["other"].astype(object).fillna("")  # all NaN (float) where there is no duplicate
    return frame.sort_values("score", ascending=False, kind="stable").reset_index(drop=True)


def min_scores(items, default=MIN_SCORE) -> dict:
    """--min_score items -> {kind: score}: a plain number sets every kind, KIND=SCORE one kind (`swap`:
    the mask swap), whatever the order; kinds not set get `default`."""
    every, per_kind = default, {}
    for item in items:
        kind, _, value = item.rpartition("=")
        kind = {"swap": "mask swap"}.get(kind, kind)
        if kind and kind not in KINDS:
            raise ValueError(f"--min_score: unknown kind {kind!r} (gender, age, mask, swap)")
        try:
            score = float(value)
        except ValueError:
            raise ValueError(f"--min_score: {item!r} is not a number or KIND=NUMBER") from None
        if not 0 <= score <= 1:
            raise ValueError(f"--min_score must be in [0, 1], got {item}")
        if kind:
            per_kind[kind] = score
        else:
            every = score
    return {kind: per_kind.get(kind, every) for kind in KINDS}


def relabel_draft(suspects, min_score, kinds=DRAFT_KINDS, drop=()) -> pd.DataFrame:
    """The suspects of `kinds` and `drop` scoring at least `min_score` ({kind: score}) as `train.py
    --relabel` rows: relabelled, or for the kinds in `drop` left out (the person, or the image)."""
    rows = []
    threshold = suspects["kind"].map(min_score).fillna(0.0)  # duplicates: already at --duplicate_min
    chosen = suspects["kind"].isin([*kinds, *drop]) & (suspects["score"] >= threshold)
    for kind, relabel in suspects.loc[chosen, ["kind", "relabel"]].itertuples(index=False):
        for row in relabel if isinstance(relabel, list) else [relabel]:
            if kind in drop:
                row = {"id": row["id"], "drop": "yes"} if row.get("id") else {"path": row["path"], "drop": "yes"}
            rows.append(row)
    columns = RELABEL_COLUMNS + ["drop"] if drop else RELABEL_COLUMNS
    draft = pd.DataFrame(rows, columns=columns, dtype=object).fillna("")  # ages stay whole numbers
    return draft.drop_duplicates(ignore_index=True)  # a person suspect of two dropped kinds: one row


def tiles(suspect, by_person) -> list:
    """(image file or None, framed) per column of a suspect's contact sheet row: the person's images
    (the suspect image, or a swap's pair, framed); for a duplicate, three of each person's images side
    by side, the two `normal` photos framed."""
    def files(person, stems):
        images = by_person[person]
        found = {Path(p).stem.lower(): (image, p) for image, p in zip(images.index, images["path"], strict=True)}
        return [(found[stem][1], found[stem][0]) if stem in found else (None, None) for stem in stems]

    if suspect.kind == "duplicate":
        stems = ("normal", "incorrect_mask", "mask1")
        pairs = files(suspect.person, stems) + [(None, None)] + files(suspect.other, stems)
        return [(file, stem == "normal") for stem, (file, _) in zip((*stems, "", *stems), pairs, strict=True)]
    order = sorted(MASK_FILES, key=lambda stem: (MASK_FILES[stem], stem))
    return [(file, image == suspect.path or (suspect.kind == "mask swap" and stem in ("incorrect_mask", "normal")))
            for stem, (file, image) in zip(order, files(suspect.person, order), strict=True)]


def sheet_rows(suspects, top) -> pd.DataFrame:
    """The `top` most likely suspects of each kind, kind after kind (mask swap, gender, mask, duplicate, age:
    the surest finds first), so that many confident age suspects cannot push the others off the sheet."""
    order = ("mask swap", "gender", "mask", "duplicate", "age")
    ranked = suspects.assign(rank=suspects.groupby("kind").cumcount() + 1)
    ranked = ranked[ranked["rank"] <= top]
    return ranked.sort_values("kind", key=lambda kind: kind.map(order.index), kind="stable")


def face_tile(file, faces):
    """The face crop of `file` as a PIL image, or None (no face crop, or no face found)."""
    if faces is None:
        return None
    crop = faces.crop(decode_image(file), file)
    return None if crop is None else Image.fromarray(crop.permute(1, 2, 0).numpy())


def contact_sheet(path, suspects, data, top=12, thumb=72, faces=None):
    """One row per suspect of `sheet_rows`: its images (see `tiles`; the suspect image framed in red) and
    the given and suggested labels written beside them. `faces`: the runs' face crop (--face_crop), so
    the tiles show what the model saw."""
    suspects = sheet_rows(suspects, top)
    label_width, pad = 260, 4
    sheet = Image.new("RGB", (label_width + len(MASK_FILES) * (thumb + pad), max(len(suspects), 1) * (thumb + pad)),
                      "white")
    draw = ImageDraw.Draw(sheet)
    by_person = {person: group for person, group in data.groupby("person")}
    for row, suspect in enumerate(suspects.itertuples()):
        y = row * (thumb + pad)
        draw.text((4, y + 4), f"{suspect.kind} #{suspect.rank}  score {suspect.score:.2f}", fill="black")
        draw.text((4, y + 22), str(suspect.person)[:40], fill="gray")
        draw.text((4, y + 40), f"given {suspect.given}"[:42], fill="black")
        draw.text((4, y + 56), f"suggested {suspect.suggested}"[:42], fill="darkred")
        for column, (file, framed) in enumerate(tiles(suspect, by_person)):
            if file is None:
                continue
            tile = face_tile(file, faces) or open_upright(file).convert("RGB")
            tile = tile.resize((thumb, thumb))
            x = label_width + column * (thumb + pad)
            sheet.paste(tile, (x, y))
            if framed:
                draw.rectangle([x, y, x + thumb - 1, y + thumb - 1], outline="red", width=3)
    atomic_write(path, lambda tmp: sheet.save(tmp, format="PNG"))


def build_parser():
    parser = tool_parser(__doc__)
    parser.add_argument("inputs", nargs="+", help="<name>_cv.json, run folders or val_probs.csv files")
    parser.add_argument("--data_dir", default=None, help="the train folder (default: the runs' own)")
    parser.add_argument("--min_score", nargs="+", default=[str(MIN_SCORE), "swap=0.5"], metavar="[KIND=]SCORE",
                        help="suspects scoring at least this go into the relabel draft: a number for every kind "
                             "and/or per kind (gender, age, mask, swap); score: 1 - the out-of-fold probability "
                             "of the given label")
    parser.add_argument("--draft_kinds", nargs="+", default=list(DRAFT_KINDS), choices=KINDS,
                        help="kinds of suspects the relabel draft holds (all are listed in audit.csv)")
    parser.add_argument("--drop", nargs="+", default=[], choices=DROP_KINDS, metavar="KIND",
                        help="kinds whose suspects the draft leaves out of training (a `drop` row: the person, "
                             "or the image) instead of relabelling them, where the audit is too unsure to relabel; "
                             "duplicate: one person of each pair of one photo")
    parser.add_argument("--duplicate_min", type=float, default=DUPLICATE_MIN, metavar="CORRELATION",
                        help="report two people as one photo where their normal images correlate at least this")
    parser.add_argument("--top", type=int, default=12, help="suspects of each kind on the contact sheet")
    parser.add_argument("--output_dir", default="audit", help="where audit.csv, relabel_draft.csv and audit.png go")
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    with one_line_errors():
        thresholds = min_scores(args.min_score)
        if args.top < 1:
            raise ValueError(f"--top must be at least 1, got {args.top}")
        if not 0 < args.duplicate_min <= 1:
            raise ValueError(f"--duplicate_min must be in (0, 1], got {args.duplicate_min}")
        files, specs = probability_files(args.inputs)
        data_dir = args.data_dir or (specs[0].data_dir if specs else None)
        if data_dir is None:
            raise ValueError("probability files alone: pass the train folder with --data_dir")
        if specs and args.data_dir and images_dir(args.data_dir).resolve() != images_dir(specs[0].data_dir).resolve():
            raise ValueError(f"--data_dir {args.data_dir} is not the runs' train folder {specs[0].data_dir}")
        bins = specs[0].age_bins if specs else DEFAULT_AGE_BINS
        table = audit_table(data_dir, bins, specs[0].relabel if specs else None)
        data = join(table, out_of_fold(files))
        given = decode_multi_class(data["ans"].to_numpy())
        data["mask"], data["gender_label"], data["age_label"] = given
        suspects = audit(data, bins, args.duplicate_min)
        out = Path(args.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        write_csv(out / "audit.csv", suspects.drop(columns="relabel"))
        draft = relabel_draft(suspects, thresholds, args.draft_kinds, args.drop)
        write_csv(out / "relabel_draft.csv", draft)
        faces = run_face_crop(specs[0], table["path"].tolist()) if specs else None
        contact_sheet(out / "audit.png", suspects, data, args.top, faces=faces)
    counts = suspects["kind"].value_counts().to_dict()
    rules = [f"{k} >= {thresholds[k]}" for k in args.draft_kinds if k not in args.drop]
    rules += [f"{k} >= {thresholds.get(k, args.duplicate_min)} left out" for k in args.drop]
    print(f"{len(suspects)} suspects in {len(data)} images ({', '.join(f'{k} {v}' for k, v in counts.items())}); "
          f"{len(draft)} relabel rows ({', '.join(rules)}) -> "
          f"{out / 'relabel_draft.csv'}, "
          f"{out / 'audit.csv'}, {out / 'audit.png'}")
    return suspects


if __name__ == "__main__":
    run_command(main)

import shutil
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

import dataset as dataset_module
import runs
from augment import CustomAugmentation, create_transforms
from dataset import (
    DataWarning,
    MaskBaseDataset,
    MaskSplitByProfileDataset,
    MultiLabelDataset,
    PrefetchLoader,
    TestDataset,
    decode_image,
    duplicate_pairs,
    fast_collate,
    fold_people,
    make_sampler,
    open_upright,
    person_table,
    scan_people,
    split_people,
    to_class_targets,
    to_head_targets,
)
from labels import AgeLabels, decode_multi_class, encode_multi_class
from sample import make_sample


def test_class_round_trip():
    for class_id in range(18):
        mask, gender, age = decode_multi_class(class_id)
        assert encode_multi_class(mask, gender, age) == class_id
    assert encode_multi_class(2, 1, 2) == 17 and encode_multi_class(1, 0, 1) == 7
    classes = torch.arange(18)
    assert torch.equal(to_class_targets(to_head_targets(classes)), classes)


def test_age_bins():
    assert [AgeLabels.from_number(a) for a in (29, 30, 59, 60)] == [0, 1, 1, 2]
    assert AgeLabels.from_number(58, bins=(30, 58)) == 2


def test_scan_table(tiny_data):
    table = scan_people(tiny_data / "train")
    assert len(table) == 24 * 7 and table["person"].nunique() == 24
    assert set(table.columns) >= {"path", "person", "id", "gender", "race", "age", "mask", "gender_label",
                                  "age_label", "class"}
    row = table[table["path"].str.endswith("incorrect_mask.jpg")].iloc[0]
    assert row["mask"] == 1 and row["class"] == 6 + row["gender_label"] * 3 + row["age_label"]


def test_scan_messy_tree(tiny_data, tmp_path):
    root = tmp_path / "images"
    shutil.copytree(tiny_data / "train" / "images", root)
    people = sorted(p for p in root.iterdir())
    (people[0] / "mask1.jpg").rename(people[0] / "MASK1.JPG")
    Image.open(people[1] / "normal.jpg").save(people[1] / "normal.png")
    (people[1] / "normal.jpg").unlink()
    (root / ".ipynb_checkpoints").mkdir()
    (root / "._000000_male_Asian_20").mkdir()
    (people[2] / "._mask1.jpg").write_bytes(b"junk")
    (root / "not_a_person").mkdir()
    (people[3] / "mask6.jpg").write_bytes(b"junk")
    (people[4] / "mask2.jpg").unlink()
    Image.open(people[6] / "mask1.jpg").save(people[6] / "mask1.png")
    with pytest.warns(UserWarning) as record:
        table = scan_people(tmp_path)
    messages = " ".join(str(w.message) for w in record)
    assert "not_a_person" in messages and "mask6.jpg" in messages and people[4].name in messages
    assert f"second files for one image, e.g. mask1.jpg beside mask1.png (the first by name is used): " \
           f"{people[6].name}/mask1.png" in messages
    assert (table["person"] == people[6].name).sum() == 7
    assert ".ipynb" not in messages and "._" not in messages
    assert len(table) == 24 * 7 - 1
    assert table["path"].str.endswith("MASK1.JPG").sum() == 1 and table["path"].str.endswith("normal.png").sum() == 1
    with pytest.warns(UserWarning) as record:
        scan_people(tmp_path, expect_complete=False)  # --extra_data: partial people are expected there
    messages = " ".join(str(w.message) for w in record)
    assert "fewer than 7" not in messages and "mask6.jpg" in messages

    (people[5] / "mask3.jpg").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="mask3.jpg"):
        scan_people(tmp_path)


def test_scan_names_strays_and_odd_people(tiny_data, tmp_path):
    root = tmp_path / "images"
    shutil.copytree(tiny_data / "train" / "images", root)
    people = sorted(p for p in root.iterdir())
    (people[0] / "extra").mkdir()
    shutil.copy(people[0] / "mask1.jpg", people[0] / "extra" / "mask1.jpg")
    shutil.copy(people[0] / "mask1.jpg", root / "stray.jpg")
    people[1].rename(root / (people[1].name + " "))
    person_id, gender, race, _ = people[2].name.split("_")
    people[2].rename(root / f"{person_id}_{gender}_{race}_540")
    twin = root / f"{people[3].name.split('_')[0]}_{'female' if 'male_' in people[3].name else 'male'}_Asian_40"
    shutil.copytree(people[4], twin)  # another person's photos under people[3]'s id
    with pytest.warns(UserWarning) as record:
        table = scan_people(tmp_path)
    messages = " ".join(str(w.message) for w in record)
    assert f"unknown files: {people[0].name}/extra/, stray.jpg" in messages
    assert f"1 people older than 120, a typo in the folder name? {person_id}_{gender}_{race}_540" in messages
    assert f"share an id with another, e.g. {min(people[3].name, twin.name)} and {max(people[3].name, twin.name)}" \
        in messages
    assert table["person"].nunique() == 25 and (table["person"] == people[1].name + " ").sum() == 7
    pd.DataFrame([dict(id=person_id, age=54)]).to_csv(tmp_path / "fix.csv", index=False)
    with pytest.warns(UserWarning) as record:
        scan_people(tmp_path, relabel=tmp_path / "fix.csv")  # the relabel fixes the typo: no age warning
    assert "older than" not in " ".join(str(w.message) for w in record)
    for fold in range(3):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _, val = fold_people(table.query("person != @people[4].name"), 3, fold, seed=0)
        assert (people[3].name in val) == (twin.name in val)


def test_data_warnings_print_as_one_line_in_the_commands():
    with runs.one_line_errors():
        data_text = warnings.formatwarning(DataWarning("x: skipped"), DataWarning, "dataset.py", 139, "line")
        other_text = warnings.formatwarning(UserWarning("y"), UserWarning, "lib.py", 7, "source")
    assert data_text == "warning: x: skipped\n"
    assert "lib.py:7: UserWarning: y" in other_text
    assert "dataset.py" in warnings.formatwarning(DataWarning("x"), DataWarning, "dataset.py", 139, "line")


def test_every_image_mode_decodes_to_uint8_rgb(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 256, (8, 6, 3), dtype=np.uint8)
    rgb = Image.fromarray(pixels)
    gray = pixels.mean(2).astype(np.uint8)
    files = {"rgba.png": rgb.convert("RGBA"), "gray.jpg": Image.fromarray(gray), "cmyk.jpg": rgb.convert("CMYK"),
             "gray16.png": Image.fromarray(gray.astype(np.uint16) * 257), "palette.png": rgb.convert("P")}
    for name, image in files.items():
        image.save(tmp_path / name)
        decoded = decode_image(tmp_path / name)
        assert decoded.dtype == torch.uint8 and decoded.shape == (3, 8, 6), name
        expected = np.asarray(Image.open(tmp_path / name).convert("RGB")) if name != "gray16.png" else gray[..., None]
        assert np.abs(decoded.permute(1, 2, 0).numpy().astype(int) - expected).max() <= 1, name


def test_exif_orientation_is_applied_as_a_viewer_shows_the_photo(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 256, (8, 6, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6  # the camera was turned: a viewer rotates the stored 6x8 pixels by 90 degrees
    for name in ("turned.jpg", "turned.png"):
        Image.fromarray(pixels).save(tmp_path / name, exif=exif.tobytes())
        assert decode_image(tmp_path / name).shape == (3, 6, 8), name
        assert open_upright(tmp_path / name).size == (8, 6), name
        upright = np.asarray(open_upright(tmp_path / name).convert("RGB")).astype(int)
        assert np.abs(decode_image(tmp_path / name).permute(1, 2, 0).numpy() - upright).max() <= 1, name


def test_scan_empty_is_clear(tmp_path):
    (tmp_path / "images" / "garbage").mkdir(parents=True)
    with pytest.raises(ValueError, match="no usable images"), pytest.warns(UserWarning):
        scan_people(tmp_path)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        scan_people(tmp_path / "nowhere")


def test_corrupt_image_named_at_load(tiny_data, tmp_path):
    shutil.copytree(tiny_data / "train", tmp_path / "train")
    dataset = MaskBaseDataset(tmp_path / "train")
    Image.new("RGB", (4, 4)).save(dataset.table.at[0, "path"], format="JPEG")
    with open(dataset.table.at[0, "path"], "r+b") as f:
        f.truncate(20)
    with pytest.raises(ValueError, match="unreadable image .*incorrect_mask"):
        dataset[0]


def test_relabel(tiny_data, tmp_path, capsys):
    table = scan_people(tiny_data / "train")
    first = table.iloc[0]
    fixes = pd.DataFrame([dict(id=first["id"], gender="female" if first["gender"] == "male" else "male", age=65),
                          dict(path=f"{first['person']}/mask1", mask="normal")])
    fixes.to_csv(tmp_path / "fix.csv", index=False, encoding="utf-8-sig")  # as Excel saves it: a BOM first
    fixed = scan_people(tiny_data / "train", relabel=tmp_path / "fix.csv")
    person = fixed[fixed["id"] == first["id"]]
    assert (person["gender"] != first["gender"]).all() and (person["age_label"] == 2).all()
    assert person[person["path"].str.endswith("mask1.jpg")]["mask"].item() == 2
    assert "changed gender of 1 people, age of 1 people, mask of 1 images" in capsys.readouterr().out
    for name, data in (("empty.csv", b""), ("binary.csv", bytes(range(128, 256)))):
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ValueError, match=f"{name}: not a relabel CSV of id,gender,age,path,mask,drop"):
            scan_people(tiny_data / "train", relabel=tmp_path / name)


def test_an_info_csv_saved_with_a_byte_order_mark_reads(tiny_data, tmp_path):
    shutil.copytree(tiny_data / "eval", tmp_path / "eval")
    info = pd.read_csv(tmp_path / "eval" / "info.csv")
    info.to_csv(tmp_path / "eval" / "info.csv", index=False, encoding="utf-8-sig")
    assert TestDataset(tmp_path / "eval").info["ImageID"].tolist() == info["ImageID"].tolist()


def test_profile_split_has_no_shared_person_and_keeps_proportions(tiny_data, monkeypatch):
    monkeypatch.setattr(dataset_module, "duplicate_pairs", lambda *args, **kwargs: [])  # drawn look-alikes
    dataset = MaskSplitByProfileDataset(tiny_data / "train", val_ratio=0.5, seed=3)
    train, val = dataset.split_indices()
    train_people = set(dataset.table["person"].iloc[train])
    val_people = set(dataset.table["person"].iloc[val])
    assert not train_people & val_people and len(train) + len(val) == len(dataset)
    strata = person_table(dataset.table)["stratum"]
    assert strata[sorted(val_people)].value_counts().to_dict() == {s: 2 for s in range(6)}
    again = MaskSplitByProfileDataset(tiny_data / "train", val_ratio=0.5, seed=3).split_indices()
    assert np.array_equal(again[1], val)


def test_one_photo_under_two_ids_stays_on_one_side_of_splits_and_folds(tmp_path):
    """A person's folder copied under another id with another label (its `normal` photo re-saved darker)
    lands on the same side of every split and in the same fold, and the run is told; an unreadable
    `normal` photo is left out of the matching, not an error."""
    train_dir = make_sample(tmp_path, n_people=12, n_eval_people=0, size=(512, 384), seed=1) / "train"
    source = sorted((train_dir / "images").iterdir())[4]
    copy = train_dir / "images" / "000777_female_Asian_61"
    shutil.copytree(source, copy)
    with Image.open(copy / "normal.jpg") as photo:
        photo.point(lambda v: int(v * 0.8)).save(copy / "normal.jpg", quality=70)
    table = scan_people(train_dir)
    assert [pair[:2] for pair in duplicate_pairs(table)] == [(source.name, copy.name)]
    apart = 0
    for seed in range(8):
        with pytest.warns(DataWarning, match=f"1 pair.*{source.name} and {copy.name}.*one side"):
            train, val = split_people(table, 0.5, seed)
        assert (source.name in val) == (copy.name in val) and len(train) + len(val) == 13
        with pytest.warns(DataWarning, match="one side"):
            folds = [set(fold_people(table, 3, fold, seed)[1]) for fold in range(3)]
        assert sorted(p for fold in folds for p in fold) == sorted(table["person"].unique())
        assert any({source.name, copy.name} <= fold for fold in folds)
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(dataset_module, "duplicate_pairs", lambda *args, **kwargs: [])
            val = split_people(table, 0.5, seed)[1]
            apart += (source.name in val) != (copy.name in val)
    assert apart > 0  # without the grouping some of these seeds split the pair
    (copy / "normal.jpg").write_bytes(b"not a photo")
    assert duplicate_pairs(table) == []
    with warnings.catch_warnings():
        warnings.simplefilter("error", DataWarning)
        MultiLabelDataset(table=table, val_ratio=0.5, seed=0).split_indices()


def test_two_people_sharing_one_photo_are_still_split_and_told(tiny_data, monkeypatch):
    """Where keeping the group together would empty a side, the split stays as it was and says so."""
    table = scan_people(tiny_data / "train")
    two = table[table["person"].isin(sorted(table["person"].unique())[:2])]
    pair = (*sorted(two["person"].unique()), 0.99)
    monkeypatch.setattr(dataset_module, "duplicate_pairs", lambda *args, **kwargs: [pair])
    with pytest.warns(DataWarning, match="kept apart, too few people"):
        train, val = split_people(two, 0.5, 0)
    assert len(train) == len(val) == 1


def test_base_split_is_by_image(tiny_data):
    dataset = MaskBaseDataset(tiny_data / "train", val_ratio=0.2)
    train, val = dataset.split_indices()
    assert len(val) == int(len(dataset) * 0.2) and not set(train) & set(val)


def test_kfold_every_person_validated_once(tiny_data):
    table = scan_people(tiny_data / "train")
    seen = []
    for fold in range(3):
        dataset = MultiLabelDataset(table=table, n_folds=3, fold=fold)
        train, val = dataset.split_indices()
        val_people = set(table["person"].iloc[val])
        assert not val_people & set(table["person"].iloc[train])
        seen.extend(val_people)
    assert sorted(seen) == sorted(table["person"].unique())
    with pytest.raises(ValueError, match="--fold"):
        MultiLabelDataset(table=table, n_folds=3, fold=3).split_indices()


def test_more_folds_than_people_in_any_stratum_still_validates_everyone_once():
    """The bundled sample: 24 people, 4 in each gender x age stratum, in 5 folds (scikit-learn refuses):
    every person validated once, the folds as even as the people allow, each stratum spread over them,
    the same folds again from the same seed."""
    table = dataset_module.scan_people(Path(__file__).resolve().parent.parent / "sample_data" / "train")
    folds = [dataset_module.fold_people(table, 5, fold, seed=0)[1] for fold in range(5)]
    people = dataset_module.person_table(table)
    assert people["stratum"].value_counts().max() < 5
    assert sorted(sum(folds, [])) == sorted(people.index) and {len(f) for f in folds} <= {4, 5}
    assert all(people.loc[f, "stratum"].nunique() >= 4 for f in folds)
    assert folds == [dataset_module.fold_people(table, 5, fold, seed=0)[1] for fold in range(5)]


def test_drop_ages_only_leaves_training(tiny_data):
    table = scan_people(tiny_data / "train")
    dropped = int(table["age"].iloc[0])
    dataset = MaskBaseDataset(table=table, drop_ages=[dropped], val_ratio=0.5)
    train, val = dataset.split_indices()
    assert dropped not in set(table["age"].iloc[train])
    kept_in_val = (table["age"].iloc[val] == dropped).sum()
    assert len(train) + len(val) == len(table) - (table["age"] == dropped).sum() + kept_in_val


def test_targets_of_each_dataset_kind(tiny_data):
    table = scan_people(tiny_data / "train")
    row = table.iloc[5]
    assert MaskBaseDataset(table=table).get_target(5) == row["class"]
    assert MultiLabelDataset(table=table).get_target(5) == (row["mask"], row["gender_label"], row["age_label"])


def test_validation_never_gets_random_augmentation(tiny_data):
    dataset = MultiLabelDataset(tiny_data / "train")
    train_tf, val_tf = create_transforms("CustomAugmentation", (64, 48), color_jitter=0.3, noise=0.1, grayscale=0.5)
    train, val = dataset.split_dataset(train_tf, val_tf)
    first = [val[0][0] for _ in range(5)]
    assert all(torch.equal(first[0], x) for x in first[1:])
    assert first[0].dtype == torch.uint8 and first[0].shape == (3, 64, 48)
    assert len({train[0][0].float().sum().item() for _ in range(6)}) > 1
    for name in ("BaseAugmentation", "AlbumentationsAugmentation"):
        train_tf, val_tf = create_transforms(name, (64, 48))
        a, b = dataset.split_dataset(train_tf, val_tf)[1][0][0], dataset.split_dataset(train_tf, val_tf)[1][0][0]
        assert torch.equal(a, b) and a.shape == (3, 64, 48)
    with pytest.raises(ValueError, match="unknown augmentation"):
        create_transforms("Nope", (64, 48))


def test_crop_follows_the_input_size():
    image = torch.zeros(3, 512, 384, dtype=torch.uint8)
    image[:, 96:416, 64:320] = 200
    crop = CustomAugmentation((320, 256), train=False)(image)
    assert crop.shape == (3, 320, 256) and (crop == 200).all()
    small = torch.zeros(3, 160, 160, dtype=torch.uint8)
    small[:, 30:130, 26:133] = 200
    assert (CustomAugmentation((100, 106), train=False)(small) == 200).all()


def test_test_dataset_order_and_missing(tiny_data, tmp_path):
    dataset = TestDataset(tiny_data / "eval", transform=create_transforms("BaseAugmentation", (32, 24))[1])
    info = pd.read_csv(tiny_data / "eval" / "info.csv")
    assert len(dataset) == len(info) and dataset[3][1] == 3
    shutil.copytree(tiny_data / "eval", tmp_path / "eval")
    for image_id in info["ImageID"][:5]:
        (tmp_path / "eval" / "images" / image_id).unlink()
    with pytest.raises(FileNotFoundError, match="5 images") as error:
        TestDataset(tmp_path / "eval")
    assert "differ in case" not in str(error.value)
    first = tmp_path / "eval" / "images" / info["ImageID"][5]
    first.rename(first.with_name(first.stem + first.suffix.upper()))
    (tmp_path / "eval" / "info.csv").write_text(info.iloc[5:].to_csv(index=False))
    with pytest.raises(FileNotFoundError, match=rf"1 images.*has {first.stem}\.JPG: the names differ in case"):
        TestDataset(tmp_path / "eval")
    first.with_name(first.stem + first.suffix.upper()).unlink()
    first.mkdir()
    with pytest.raises(FileNotFoundError, match=rf"1 images.*{first.name} is a folder, not an image\)$"):
        TestDataset(tmp_path / "eval")
    first.rmdir()
    shutil.copy(tiny_data / "eval" / "images" / first.name, first)
    spaced = info.iloc[5:].assign(ImageID=lambda t: t["ImageID"].where(t.index != 5, t["ImageID"] + " "))
    (tmp_path / "eval" / "info.csv").write_text(spaced.to_csv(index=False))
    with pytest.raises(FileNotFoundError, match=r"has spaces at its ends\)$"):
        TestDataset(tmp_path / "eval")


def test_sampler_balances_classes():
    labels = np.array([0] * 90 + [1] * 10)
    drawn = np.array(list(make_sampler(labels, seed=0)))
    assert 0.35 < (labels[drawn] == 1).mean() < 0.65


def test_cpu_prefetch_equals_float_reference(tiny_data):
    dataset = MultiLabelDataset(tiny_data / "train")
    _, val = dataset.split_dataset(*create_transforms("CustomAugmentation", (64, 48)))
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    loader = torch.utils.data.DataLoader(val, batch_size=8, collate_fn=fast_collate)
    images, targets = next(iter(PrefetchLoader(loader, mean, std, device="cpu")))
    assert images.dtype == torch.float32 and targets.shape == (8, 3)
    reference = T.Normalize(mean, std)(torch.stack([val[i][0] for i in range(8)]).float() / 255)
    assert torch.allclose(images, reference, atol=1e-6)
    half = next(iter(PrefetchLoader(loader, mean, std, device="cpu", dtype=torch.bfloat16)))[0]
    assert half.dtype == torch.bfloat16
    empty = torch.utils.data.DataLoader(torch.utils.data.Subset(val, []), batch_size=8, collate_fn=fast_collate)
    assert list(PrefetchLoader(empty, mean, std, device="cpu")) == []


def test_bundled_sample_is_small_and_valid():
    from conftest import ROOT
    size = sum(p.stat().st_size for p in (ROOT / "sample_data").rglob("*") if p.is_file())
    assert size <= 5 * 1024 * 1024
    assert len(scan_people(ROOT / "sample_data" / "train")) == 24 * 7
    assert len(TestDataset(ROOT / "sample_data" / "eval")) == 42


def test_relabel_drop_rows_leave_a_person_or_an_image_out(tiny_data, tmp_path, capsys):
    table = scan_people(tiny_data / "train")
    first, second = table["person"].unique()[:2]
    first_id = table.loc[table["person"] == first, "id"].iloc[0]
    fixes = pd.DataFrame([dict(id=first_id, drop="yes"), dict(path=f"{second}/normal", drop="1"),
                          dict(path=f"{second}/mask2", mask="incorrect", drop="no")])
    fixes.to_csv(tmp_path / "fix.csv", index=False)
    fixed = scan_people(tiny_data / "train", relabel=tmp_path / "fix.csv")
    assert first not in set(fixed["person"]) and len(fixed) == len(table) - 7 - 1
    kept = fixed[fixed["person"] == second]
    assert not kept["path"].str.contains("normal").any() and len(kept) == 6
    assert kept[kept["path"].str.contains("mask2")]["mask"].item() == 1
    assert "mask of 1 images; left out 8 images (1 whole people)" in capsys.readouterr().out
    for rows, message in (([dict(id=first_id, drop="maybe")], "bad drop value 'maybe'"),
                          ([dict(gender="male", drop="yes")], "a drop row needs an id"),
                          ([dict(path="999_male_Asian_30/normal", drop="yes")], "999_male_Asian_30/normal is not in")):
        pd.DataFrame(rows).to_csv(tmp_path / "bad.csv", index=False)
        with pytest.raises(ValueError, match=message):
            scan_people(tiny_data / "train", relabel=tmp_path / "bad.csv")


def test_a_race_with_an_underscore_still_parses(tiny_data, tmp_path):
    root = tmp_path / "images"
    source = sorted((tiny_data / "train" / "images").iterdir())[0]
    shutil.copytree(source, root / "000321_female_South_Asian_33")
    person = scan_people(tmp_path)
    assert len(person) == 7 and person["race"].eq("South_Asian").all() and person["age"].eq(33).all()
    assert person["gender"].eq("female").all() and person["id"].eq("000321").all()

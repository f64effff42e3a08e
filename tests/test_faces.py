"""--face_crop: the face stage with an injected fake detector (the drawn sample faces need not look like
faces to a real one), and YuNet itself on a few real photos from ../shared."""
import json
import os
import shutil

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import SHARED

import ensemble
import faces
import inference
import train
from augment import create_transforms, crop_region
from cache import cache_key
from faces import FaceDetectorError, choose_face, find_faces, square_box, typical_face

YUNET = SHARED / "weights" / "face_detection_yunet_2026may.onnx"


class CentreFace:
    """A fake detector: one face, a box of half the image's width around its centre; none in images
    narrower than `min_width`. Counts its calls (and appends them to `calls`, a list shared by instances)."""

    def __init__(self, path=None, score=0.5, min_width=0, calls=None):
        self.min_width, self.count, self.calls = min_width, 0, calls

    def detect(self, rgb):
        self.count += 1
        if self.calls is not None:
            self.calls.append(1)
        height, width = rgb.shape[:2]
        if width < self.min_width:
            return np.zeros((0, 5), np.float32)
        return np.array([[width / 4, height / 2 - width / 4, width / 2, width / 2, 0.9]], np.float32)


def test_the_face_near_the_centre_wins_over_a_more_confident_one_in_a_corner():
    boxes = [[0, 0, 20, 20, 0.99], [40, 50, 30, 30, 0.7]]
    assert choose_face(boxes, 128, 96)[:4] == (40, 50, 30, 30)
    assert choose_face([], 128, 96) is None
    assert choose_face([[0, 0, 20, 20, 0.99]], 128, 96)[4] == pytest.approx(0.99)


def test_the_crop_is_a_square_of_margin_times_the_larger_side_padded_by_edge_replication():
    top, left, side = square_box((10, 20, 30, 40), 1.5)  # x, y, w, h
    assert side == 60 and (top, left) == (20 + 20 - 30, 10 + 15 - 30)
    image = torch.arange(4 * 5, dtype=torch.uint8).view(1, 4, 5).expand(3, 4, 5)
    crop = crop_region(image, -2, -1, 7)
    assert crop.shape == (3, 7, 7)
    assert torch.equal(crop[:, 2:6, 1:6], image)  # the image itself, in place
    assert torch.equal(crop[:, 0], crop[:, 2]) and torch.equal(crop[:, :, 6], crop[:, :, 5])  # edges repeated


def test_boxes_are_found_once_and_kept_in_the_cache(tiny_data, tmp_path):
    paths = sorted(str(p) for p in (tiny_data / "eval" / "images").iterdir())[:6]
    detector = CentreFace()
    found = find_faces(paths, "fake", cache_dir=tmp_path, detector=detector)
    assert detector.count == 6 and not found.missing()
    again = CentreFace()
    assert find_faces(paths, "fake", cache_dir=tmp_path, detector=again).boxes == found.boxes and again.count == 0
    os.utime(paths[0], ns=(1, 1))  # a changed file is detected again, alone
    third = CentreFace()
    find_faces(paths, "fake", cache_dir=tmp_path, detector=third)
    assert third.count == 1
    other_score = CentreFace()
    find_faces(paths, "fake", score=0.6, cache_dir=tmp_path, detector=other_score)
    assert other_score.count == 6  # another detector setting is another cache


def test_images_without_a_face_keep_the_centre_crop(tiny_data, tmp_path):
    path = str(next((tiny_data / "eval" / "images").iterdir()))
    found = find_faces([path], "fake", margin=1.0, cache_dir=tmp_path, detector=CentreFace())
    none = find_faces([path], "fake", cache_dir=tmp_path / "other", detector=CentreFace(min_width=10_000))
    assert none.missing() == [os.path.abspath(path)]
    from dataset import decode_image
    image = decode_image(path)
    _, val_tf = create_transforms("CustomAugmentation", (32, 32))
    width = image.shape[2]
    top, left, side = square_box(found.boxes[os.path.abspath(path)], 1.0)
    assert found.regions([path]) == [(top, left, side)] and none.regions([path]) == [None]
    expected = create_transforms("BaseAugmentation", (32, 32))[1](image[:, top:top + side, left:left + side])
    assert side == width // 2 and torch.equal(val_tf(image, found.region(path)), expected)
    assert torch.equal(val_tf(image, none.region(path)), val_tf(image))  # the centre crop
    assert cache_key([path], val_tf, found.regions([path])) != cache_key([path], val_tf, none.regions([path]))
    assert cache_key([path], val_tf, none.regions([path])) == cache_key([path], val_tf)


def test_images_without_a_face_take_the_typical_face_square_of_the_training_images():
    boxes = {"a": (10, 20, 30, 30, 0.9), "b": (20, 40, 40, 40, 0.8), "c": (0, 0, 8, 10, 0.7), "d": None}
    sizes = {"a": (100, 80), "b": (200, 160), "c": (50, 40), "d": (100, 80)}
    fallback = typical_face(boxes, sizes)  # medians of centre x / width, centre y / height, side / short side
    assert fallback == (0.25, 0.3, 0.25)
    assert typical_face({"d": None}, sizes) is None
    image = torch.arange(100 * 80, dtype=torch.int32).view(1, 100, 80)
    crop = faces.FaceCrop({os.path.abspath("d"): None}, margin=1.2, fallback=fallback,
                          sizes={os.path.abspath("d"): (100, 80)})
    top, left, side = square_box((10, 20, 20, 20), 1.2)  # 0.25 * 80 - 10, 0.3 * 100 - 10, 0.25 * 80
    assert crop.regions(["d"]) == [(top, left, side)] and side == 24  # from the size recorded at detection
    assert torch.equal(crop.crop(image, "d"), crop_region(image, top, left, side))
    without = faces.FaceCrop({os.path.abspath("d"): None}, margin=1.2, sizes={os.path.abspath("d"): (100, 80)})
    assert without.regions(["d"]) == [None] and without.crop(image, "d") is None
    assert without.settings["fallback"] is None
    with pytest.raises(ValueError, match="no face box or image size recorded"):  # never a silent centre crop
        faces.FaceCrop({}, fallback=fallback).regions(["elsewhere.jpg"])


@pytest.mark.parametrize("flags, message", [
    (["--face_margin", "0.5"], "--face_margin must be in [1.0, 3.0]"),
    (["--face_score", "1.5"], "--face_score must be in (0, 1)"),
    (["--face_detector", "no/such.onnx"], "--face_detector: file not found: no/such.onnx"),
])
def test_bad_face_flags_are_one_line_errors(tiny_data, tmp_path, flags, message):
    with pytest.raises(SystemExit) as error:
        train.main(["--data_dir", str(tiny_data / "train"), "--model_dir", str(tmp_path), "--face_crop", *flags])
    assert message in str(error.value) and "\n" not in str(error.value)
    assert not any(tmp_path.iterdir())  # no run folder


def test_a_damaged_detector_file_is_a_one_line_error(tmp_path):
    bad = tmp_path / "yunet.onnx"
    bad.write_bytes(b"not an onnx model")
    with pytest.raises(FaceDetectorError, match=f"{bad} is not a readable YuNet ONNX model") as error:
        faces.YuNet(bad)
    assert "\n" not in str(error.value)


@pytest.fixture()
def fake_yunet(monkeypatch, tmp_path):
    """faces.YuNet replaced by CentreFace; (a detector file that exists, the list of detection calls)."""
    calls = []
    monkeypatch.setattr(faces, "YuNet", lambda path, score: CentreFace(path, score, calls=calls))
    detector = tmp_path / "fake_yunet.onnx"
    detector.write_bytes(b"fake")
    return detector, calls


def test_a_face_crop_run_records_its_settings_and_inference_repeats_them(tiny_data, tmp_path, fake_yunet,
                                                                         monkeypatch):
    fake_yunet, calls = fake_yunet
    runs, cache = tmp_path / "runs", tmp_path / "cache"
    train.main(["--data_dir", str(tiny_data / "train"), "--model_dir", str(runs), "--model", "test_resnet",
                "--pretrained", "none",
                "--resize", "32", "32", "--num_workers", "0", "--epochs", "1", "--report", "off", "--cache",
                "--cache_dir", str(cache), "--face_crop", "--face_detector", str(fake_yunet), "--face_margin", "1.2"])
    config = json.loads((runs / "exp" / "config.json").read_text())
    assert config["face_crop"] and config["face_margin"] == 1.2
    assert config["faces"]["no_face"] == 0 and config["faces"]["images"] == 168
    assert config["faces"]["fallback"] == [0.5, 0.5, 0.5]  # CentreFace's box, relative to the image
    assert (runs / "exp" / "no_face.csv").is_file()
    assert len(calls) == 168
    calls.clear()
    train.main(["--data_dir", str(tiny_data / "train"), "--model_dir", str(runs), "--model", "test_resnet",
                "--pretrained", "none",
                "--resize", "32", "32", "--num_workers", "0", "--epochs", "1", "--report", "off",
                "--cache_dir", str(cache), "--face_crop", "--face_detector", str(fake_yunet), "--face_margin", "1.2"])
    assert calls == []  # the second run detects nothing
    used, regions = [], []
    real_crop, real_files = faces.run_face_crop, inference.ImageFiles
    monkeypatch.setattr(faces, "run_face_crop", lambda *a, **k: used.append(real_crop(*a, **k)) or used[-1])
    monkeypatch.setattr(inference, "ImageFiles", lambda paths, transform, where: regions.append(where)
                        or real_files(paths, transform, where))
    out = tmp_path / "out"
    inference.main(["--model_dir", str(runs / "exp"), "--data_dir", str(tiny_data / "eval"), "--output_dir",
                    str(out), "--num_workers", "0", "--cache_dir", str(cache), "--face_crop"])
    crop = used[0]
    assert crop.margin == 1.2 and crop.settings["score"] == config["face_score"] and len(calls) == 42
    assert crop.fallback == (0.5, 0.5, 0.5)  # the run's typical face, not the eval images'
    assert len(regions[0]) == 42 and all(region is not None for region in regions[0])  # each image its face square
    assert pd.read_csv(out / "no_face.csv").empty
    ensemble.main([str(runs / "exp"), str(runs / "exp2"), "--data_dir", str(tiny_data / "eval"), "--output_dir",
                   str(out), "--num_workers", "0", "--cache_dir", str(cache)])
    assert len(calls) == 42  # the eval boxes were kept too
    ensemble.main([str(runs / "exp"), str(runs / "exp2"), "--data_dir", str(tiny_data / "eval"), "--output_dir",
                   str(tmp_path / "again"), "--num_workers", "0", "--cache_dir", str(cache)])
    assert pd.read_csv(tmp_path / "again" / "no_face.csv").empty and len(calls) == 42  # from the members' cache
    import run_page
    text = run_page.run_report(runs / "exp", cams=True)
    assert "Face crops" in text and "168 of 168 images with a face" in text


def test_face_crop_at_inference_needs_a_run_trained_with_it(tiny_data, tmp_path, capsys):
    runs = tmp_path / "runs"
    train.main(["--data_dir", str(tiny_data / "train"), "--model_dir", str(runs), "--model", "test_resnet",
                "--pretrained", "none",
                "--resize", "32", "32", "--num_workers", "0", "--epochs", "1", "--report", "off"])
    with pytest.raises(SystemExit) as error:
        inference.main(["--model_dir", str(runs / "exp"), "--data_dir", str(tiny_data / "eval"),
                        "--output_dir", str(tmp_path / "out"), "--face_crop"])
    assert "trained without --face_crop" in str(error.value) + capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_yunet_finds_the_faces_of_real_photos(tmp_path):
    labels = SHARED / "data" / "realmask" / "labels.csv"
    if not YUNET.is_file() or not labels.is_file():
        pytest.skip(f"shared detector or photos not found: {YUNET}, {labels}")
    table = pd.read_csv(labels)
    picked = pd.concat([table[table["mask"] == 0].head(4), table[table["mask"] == 2].head(4)])
    paths = [str(labels.parent / "eval" / "images" / name) for name in picked["ImageID"]]
    found = find_faces(paths, YUNET, cache_dir=tmp_path, num_workers=0)
    assert len(found.missing()) <= 1
    for path in paths:
        box = found.boxes[os.path.abspath(path)]
        if box is not None:
            assert box[2] > 16 and box[3] > 16 and 0.5 <= box[4] <= 1
    folder, out = tmp_path / "photos", tmp_path / "sheet"
    folder.mkdir()
    for path in paths:
        shutil.copy(path, folder)
    faces.main([str(folder), "--face_detector", str(YUNET), "--cache_dir", str(tmp_path), "--output_dir", str(out),
                "--num_workers", "0"])
    boxes = pd.read_csv(out / "boxes.csv")
    assert len(boxes) == 8 and boxes["w"].notna().sum() >= 7
    assert (out / "faces.png").stat().st_size > 0 and (out / "no_face.csv").is_file()


def test_the_audit_sheet_of_face_crop_runs_shows_the_crops(tiny_data, tmp_path, fake_yunet, monkeypatch):
    import audit
    fake_yunet, calls = fake_yunet
    runs, cache = tmp_path / "runs", tmp_path / "cache"
    train.main(["--data_dir", str(tiny_data / "train"), "--model_dir", str(runs), "--model", "test_resnet",
                "--pretrained", "none",
                "--resize", "32", "32", "--num_workers", "0", "--epochs", "1", "--report", "off", "--n_folds", "2",
                "--cache_dir", str(cache), "--face_crop", "--face_detector", str(fake_yunet), "--name", "cv"])
    before = len(calls)
    tiles = []
    real_tile = audit.face_tile
    monkeypatch.setattr(audit, "face_tile", lambda file, faces: tiles.append(faces) or real_tile(file, faces))
    audit.main([str(runs / "cv_cv.json"), "--output_dir", str(tmp_path / "audit")])
    assert (tmp_path / "audit" / "audit.png").is_file() and len(calls) == before  # boxes from the cache
    assert tiles and all(faces is not None and faces.margin == 1.05 for faces in tiles)


def test_a_dataset_crops_each_image_at_its_own_region_cached_or_not(tiny_data, tmp_path):
    from cache import DecodedCache
    from dataset import MaskSplitByProfileDataset, decode_image, scan_people
    table = scan_people(tiny_data / "train", check_images=False)
    regions = pd.Series([(4, 2, 20) if i % 2 else None for i in range(len(table))], dtype=object)
    dataset = MaskSplitByProfileDataset(table=table.assign(region=regions))
    _, val_tf = create_transforms("CustomAugmentation", (32, 32))
    expected = [val_tf(decode_image(dataset.paths[0])), val_tf(decode_image(dataset.paths[1]), (4, 2, 20))]
    assert not torch.equal(expected[1], val_tf(decode_image(dataset.paths[1])))
    assert all(torch.equal(dataset.image(i, val_tf), expected[i]) for i in (0, 1))
    dataset.cache = DecodedCache.build(dataset.paths, val_tf, tmp_path, regions=dataset.regions)
    assert all(torch.equal(dataset.image(i, val_tf), expected[i]) for i in (0, 1))
    plain = DecodedCache.build(dataset.paths, val_tf, tmp_path)  # other regions: another cache file
    assert plain.data_path != dataset.cache.data_path

"""report.py: a self-contained report for each model kind, older runs without validation
probabilities, run comparisons with k-fold spread, and a real headless browser rendering it."""
import ast
import re
import shutil
import subprocess

import numpy as np
import pytest
from PIL import Image

from conftest import ROOT

import report
import run_page
import train

SECTION_IDS = list(run_page.SECTIONS)


def train_run(model_dir, data, name, *flags):
    train.main(["--data_dir", str(data / "train"), "--model_dir", str(model_dir), "--name", name, "--model",
                "test_resnet", "--resize", "32", "24", "--num_workers", "0", "--epochs", "1", "--lr", "3e-3",
                "--cache_dir", str(model_dir / "cache"), *flags])
    return model_dir / name


@pytest.fixture(scope="module")
def runs(tiny_data, tmp_path_factory):
    model_dir = tmp_path_factory.mktemp("report_runs")
    return dict(three_head=train_run(model_dir, tiny_data, "three"),
                single_head=train_run(model_dir, tiny_data, "single", "--kind", "single_head"),
                multi_backbone=train_run(model_dir, tiny_data, "multi", "--kind", "multi_backbone", "--backbones",
                                         "age=test_efficientnet"),
                vit=train_run(model_dir, tiny_data, "vit", "--model", "test_vit", "--resize", "32", "32",
                              "--report", "off"),
                kfold=(train_run(model_dir, tiny_data, "cv", "--n_folds", "2", "--report", "off"),
                       model_dir / "cv_cv.json")[1])


def images_of(text):
    return re.findall(r"<img [^>]*src=\"([^\"]*)\"", text)


def test_train_writes_a_cheap_report(runs):
    text = (runs["three_head"] / "report.html").read_text()
    assert all(f'id="{key}"' in text for key in SECTION_IDS)
    assert "no class activation maps asked for" in text and not (runs["vit"] / "report.html").exists()


@pytest.mark.parametrize("kind", ["three_head", "single_head", "multi_backbone", "vit"])
def test_a_full_report_for_each_model_kind_is_self_contained(runs, kind):
    path = report.main([str(runs[kind])])
    text = path.read_text()
    assert all(f'id="{key}"' in text for key in SECTION_IDS)
    sources = images_of(text)
    assert sources and all(src.startswith("data:image/") for src in sources)
    assert "http://" not in text and "https://" not in text and "file:" not in text
    cams = text.split('id="cams"')[1]
    if kind == "vit":
        assert "no convolutional layer" in cams and not images_of(cams)
    else:
        assert len(images_of(cams)) == 6  # 4 confident errors and 2 correct images, a figure each
    assert "true: " in text and "predicted: " in text and "wrong:" in text
    assert "flags that differ from train.py's defaults first" in text


def test_an_older_run_without_validation_probabilities(runs, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(runs["three_head"], old)
    (old / "val_probs.csv").unlink()
    text = report.main([str(old)]).read_text()
    assert text.count("this run has no val_probs.csv") == 4
    assert len(images_of(text.split('id="curves"')[1].split('id="confusion"')[0])) == 1


def test_several_runs_and_a_kfold_run_side_by_side(runs, tmp_path):
    out = tmp_path / "compare.html"
    report.main([str(runs["three_head"]), str(runs["single_head"]), str(runs["kfold"]), "--out", str(out)])
    text = out.read_text()
    assert "Comparison of 3 runs" in text and "cv_cv" in text and " ± " in text
    assert "<td>kind</td>" in text and all(src.startswith("data:image/") for src in images_of(text))


def test_the_report_opens_in_a_headless_browser(runs, tmp_path):
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("Chromium is not installed (.ci/run installs Debian's chromium where it can)")
    path = report.main([str(runs["three_head"])])
    flags = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}", "--hide-scrollbars"]
    dom = subprocess.run([*flags, "--dump-dom", path.resolve().as_uri()], capture_output=True, text=True,
                         timeout=120).stdout
    assert all(f">{title}</h2>" in dom for title in run_page.SECTIONS.values())
    shot = tmp_path / "shot.png"
    subprocess.run([*flags, "--window-size=1300,5000", f"--screenshot={shot}", path.resolve().as_uri()],
                   capture_output=True, timeout=120)
    with Image.open(shot) as image:
        pixels = np.asarray(image.convert("L"), dtype=float)
    rows_with_ink = (pixels < 200).any(axis=1)
    assert image.size == (1300, 5000) and rows_with_ink[:400].any() and rows_with_ink[2000:].any()


def test_no_module_below_the_tools_imports_them():
    """The tools around the loop (audit, search, report) read run folders: no other module imports them."""
    tools = {"audit", "search", "report"}
    for path in sorted(ROOT.glob("*.py")):
        if path.stem in tools:
            continue
        tree = ast.parse(path.read_text())
        imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                    for alias in node.names}
        imported |= {node.module.split(".")[0] for node in ast.walk(tree)
                     if isinstance(node, ast.ImportFrom) and node.module}
        assert not imported & tools, f"{path.name} imports {sorted(imported & tools)}"

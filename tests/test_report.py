"""report.py: a self-contained report for each model kind, older runs without validation
probabilities, run comparisons with k-fold spread, and a real headless browser rendering it."""
import ast
import html
import json
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
    """A one-epoch run from random weights (the test models' timm weights need the network)."""
    train.main(["--data_dir", str(data / "train"), "--model_dir", str(model_dir), "--name", name, "--model",
                "test_resnet", "--pretrained", "none", "--resize", "32", "24", "--num_workers", "0", "--epochs",
                    "1", "--lr", "3e-3",
                "--pretrained", "none", "--cache_dir", str(model_dir / "cache"), *flags])
    return model_dir / name


@pytest.fixture(scope="module")
def runs(tiny_data, tmp_path_factory):
    model_dir = tmp_path_factory.mktemp("report_runs")
    return dict(three_head=train_run(model_dir, tiny_data, "three"),
                single_head=train_run(model_dir, tiny_data, "single", "--kind", "single_head"),
                multi_backbone=train_run(model_dir, tiny_data, "multi", "--kind", "multi_backbone", "--backbones",
                                         "age=test_efficientnet"),
                vit=train_run(model_dir, tiny_data, "vit", "--model", "test_vit", "--pretrained", "none",
                              "--resize", "32", "32",
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
    assert "flag changed from its default" in text


def first_column(text, css_class):
    """The first cells of a table's rows (its header row left out)."""
    table = re.search(f'<table class="{css_class}">(.*?)</table>', text).group(1)
    return [html.unescape(cell) for cell in re.findall(r"<tr[^>]*><td>(.*?)</td>", table)]


def test_the_page_opens_on_what_the_run_learned(runs):
    """Title, a one-line summary, the curves and confusion matrices; then the key settings and the flags
    that differ from the defaults, with every setting folded under them."""
    run = runs["three_head"]
    text = report.main([str(run)]).read_text()
    config = json.loads((run / "config.json").read_text())
    order = [text.index(f'id="{key}"') for key in SECTION_IDS]
    assert order == sorted(order) and SECTION_IDS[:3] == ["curves", "confusion", "settings"]
    summary = text.split("</h1>")[1].split('id="curves"')[0]
    assert "best validation macro F1 <b>" in summary and "at epoch 1 of 1" in summary
    assert "model test_resnet (three_head)" in summary
    settings = text.split('id="settings"')[1].split('id="classes"')[0]
    shown, folded = settings.split("<details>")
    assert first_column(shown, "key-settings") == ["model", "input size (H × W)", "epochs", "batch size",
                                                   "learning rate", "starting weights", "device"]
    assert "<td>32 × 24</td>" in shown and "<td>random init (--pretrained none)</td>" in shown
    changed = config["changed_flags"]
    assert "lr" in changed and "seed" not in changed
    assert first_column(shown, "changed-flags") == [key for key in config if key in changed]
    every = first_column(folded, "all-settings")
    assert folded.startswith("<summary>All settings") and set(changed) < set(every) and "seed" in every
    assert every[:len(changed)] == first_column(shown, "changed-flags")  # changed first, in bold, in the fold too


def test_an_older_config_without_changed_flags_shows_every_setting_folded(runs, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(runs["three_head"], old)
    config = json.loads((old / "config.json").read_text())
    del config["changed_flags"]
    (old / "config.json").write_text(json.dumps(config))
    settings = report.main([str(old), "--no_cams"]).read_text().split('id="settings"')[1]
    shown, folded = settings.split('id="classes"')[0].split("<details>")
    assert "does not record which flags differ" in shown and 'class="changed-flags"' not in shown
    assert "seed" in first_column(folded, "all-settings") and "lr" in first_column(folded, "all-settings")
    (old / "config.json").write_text(json.dumps({**config, "changed_flags": []}))
    assert "every flag at train.py's default" in report.main([str(old), "--no_cams"]).read_text()


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


# measures the laid-out page once its inline images are decoded, into a <pre> that --dump-dom prints
LAYOUT_SCRIPT = """<script>addEventListener("load", () => {
  const box = e => { const b = e.getBoundingClientRect();
    return [b.left, b.top + scrollY, b.right, b.bottom + scrollY]; };
  const figures = [...document.querySelectorAll("figure")].map(f => { const c = f.querySelector("figcaption");
    return {figure: box(f), caption: box(c), overflow: c.scrollWidth - c.clientWidth}; });
  const layout = {curves: box(document.querySelector("#curves + img")),
    settings: box(document.getElementById("settings")),
    confusion: box(document.getElementById("confusion")), shown: box(document.querySelector("table.changed-flags")),
    folded: document.querySelector("table.all-settings").checkVisibility(),
    classes: box(document.getElementById("classes")), figures};
  const pre = document.createElement("pre"); pre.id = "layout"; pre.textContent = JSON.stringify(layout);
  document.body.append(pre); });</script>"""


def overlap(a, b) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


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
    measured = tmp_path / "measured.html"
    measured.write_text(path.read_text().replace("</body>", LAYOUT_SCRIPT + "</body>"))
    dom = subprocess.run([*flags, "--window-size=1280,800", "--dump-dom", measured.resolve().as_uri()],
                         capture_output=True, text=True, timeout=120).stdout
    layout = json.loads(html.unescape(re.search(r'<pre id="layout">(.*?)</pre>', dom).group(1)))
    curves, settings = layout["curves"], layout["settings"]
    assert curves[3] - curves[1] > 100 and curves[3] < 800  # the curves, drawn, on a laptop's first screen
    assert curves[3] <= layout["confusion"][1] < settings[1]
    assert layout["shown"][3] > layout["shown"][1] and not layout["folded"]  # all the settings: folded, no room
    assert layout["classes"][1] - layout["shown"][3] < 150
    figures = layout["figures"]
    assert len(figures) > 10 and all(f["overflow"] <= 0 for f in figures)
    for i, first in enumerate(figures):
        left, top, right, bottom = first["figure"]
        assert left <= first["caption"][0] and first["caption"][2] <= right and first["caption"][3] <= bottom
        assert not any(overlap(first["figure"], other["figure"]) for other in figures[i + 1:])
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

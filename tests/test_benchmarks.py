import importlib
import re

import pandas as pd
import pytest

from conftest import ROOT, SHARED

from sample import make_sample


def bench_module(name, monkeypatch):
    """A benchmark script imported to call its main() in this process (no interpreter start)."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    return importlib.import_module(name)


def test_bench_data_smoke(tmp_path, monkeypatch):
    """bench_data.py end to end: each loader measured in its own process, a row each, the memory ratio."""
    out = tmp_path / "result.md"
    bench_module("bench_data", monkeypatch).main(["--work_dir", str(tmp_path), "--out", str(out), "--people", "6",
                                                  "--workers", "0", "--epochs", "1", "--batch_size", "8",
                                                  "--resize", "64", "48"])
    table = out.read_text()
    assert table.count("| 0 |") == 5 and "ratio to (a)" in table and "Peak memory with the cache" in table


def test_bench_layout_times_each_freeze_setting(tmp_path, monkeypatch):
    """bench_layout.py --freeze: one row per setting and precision, the frozen model stepped as train.py
    freezes it (its optimizer only gets the trainable parameters, so "all" must not fail)."""
    out = tmp_path / "layout.md"
    bench_module("bench_layout", monkeypatch).main(["--models", "test_resnet:32x32", "--amp", "off", "--steps", "1",
                                                    "--batch_size", "4", "--freeze", "none", "1", "all",
                                                    "--out", str(out)])
    rows = [line for line in out.read_text().splitlines() if line.startswith("| test_resnet | 32x32 |")]
    assert [row.split(" | ")[2] for row in rows] == ["none", "1", "all"]


def test_bench_train_smoke(tmp_path, monkeypatch):
    out = tmp_path / "result.md"
    bench_module("bench_train", monkeypatch).main(["--work_dir", str(tmp_path), "--out", str(out), "--people", "6",
                                                   "--models", "test_resnet:64x48", "--steps", "2",
                                                   "--batch_size", "8", "--workers", "0"])
    table = out.read_text()
    assert table.count("| test_resnet |") == 6 and "1.00x" in table and "kernels" in table
    assert "defaults (--amp auto --channels_last auto)" in table


def test_gpu_check_without_cuda_says_so_and_exits_0(monkeypatch, capsys):
    import torch
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert bench_module("gpu_check", monkeypatch).main([]) is None  # its __main__ then exits 0
    assert capsys.readouterr().out.strip() == "gpu_check: no CUDA device on this machine; nothing to check (exit 0)"


def test_recipe_blocks_run_as_written_and_are_scored(tmp_path, shared_weights, monkeypatch):
    """The README's copy-paste recipes (benchmarks/recipes/*.sh), run by bench_recipes.py on a tiny set
    with every flag as written but one epoch at 32x32 in fp32 (`--amp auto`'s timing, 8 s a run here, is
    tested on its own) and two members of one_hour's four (its MEMBERS variable; the two references
    differ from same_budget only in flags the unit tests cover, one_hour_folds is a candidate the README
    does not show)."""
    if not (SHARED / "weights" / "faceres_vggface2_mobilenetv1" / "config.json").is_file():
        pytest.skip("the shared face backbone is not here: same_budget.sh trains it")
    data = make_sample(tmp_path / "data", n_people=12, n_eval_people=3, size=(64, 48), seed=2)
    results, recipes = tmp_path / "recipes.csv", ["same_budget", "one_hour"]
    (tmp_path / "recipes").mkdir()
    for recipe in recipes:
        text = (ROOT / "benchmarks" / "recipes" / f"{recipe}.sh").read_text()
        small = re.sub(r"--resize \d+ \d+", "--resize 32 32", text.replace("--epochs 3", "--epochs 1 --amp off"))
        assert small.count("--resize 32 32") == text.count("--resize") == 1 and "--epochs 1 --amp off" in small
        (tmp_path / "recipes" / f"{recipe}.sh").write_text(small)
    monkeypatch.setenv("MEMBERS", "0 1")
    bench_module("bench_recipes", monkeypatch).main(["--data", str(data), "--weights", str(shared_weights),
                                                     "--work_dir", str(tmp_path / "work"), "--results", str(results),
                                                     "--recipes_dir", str(tmp_path / "recipes"), "--recipes", *recipes])
    rows = pd.read_csv(results)
    assert list(rows["recipe"]) == recipes and rows["f1"].between(0, 1).all() and "cores" in rows["machine"][0]
    assert sorted(p.parent.name for p in (tmp_path / "work" / "one_hour_s0").glob("*/best.pth")) == \
        ["seed0", "seed1"]
    assert results.with_suffix(".md").read_text().count("| one_hour | 1 |") == 1


def test_recipe_minutes_are_given_against_the_reference_of_the_same_run(monkeypatch):
    """bench_recipes.py's same-budget check: a recipe's minutes over the plain reference's of the same seed
    and invocation; rows of runs without the reference (older CSVs too) leave the column empty."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    from bench_recipes import summary, with_reference_ratio
    common = dict(f1=0.7, mask_acc=1.0, gender_acc=0.9, age_f1=0.75, machine="m", amp="off")
    rows = with_reference_ratio([dict(recipe="same_budget", seed=0, minutes=9.0, **common),
                                 dict(recipe="reference", seed=0, minutes=10.0, **common),
                                 dict(recipe="same_budget", seed=1, minutes=9.0, **common)])
    assert [round(row["x_reference"], 2) for row in rows[:2]] == [0.9, 1.0] and pd.isna(rows[2]["x_reference"])
    older = pd.DataFrame([dict(recipe="one_hour", seed=0, minutes=44.0, **common)])
    table = summary(pd.concat([older, pd.DataFrame(rows)], ignore_index=True))
    assert "| one_hour | 1 | 0.700 | 0.900 | 0.750 | 44.0 |  | m | off |" in table
    assert "| same_budget | 2 | 0.700 +- 0.000 | 0.900 | 0.750 | 9.0 | 0.90 | m | off |" in table


def test_candidates_are_rows_of_one_table_over_kept_recipes(monkeypatch):
    """benchmarks/recipes/candidates.yaml: each candidate names a kept recipe and its changed flags."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    from bench_recipes import RECIPES_DIR, candidate_flags, read_candidates, recipe_script
    candidates = read_candidates()
    assert {"same_budget_face", "same_budget_facecrop", "same_budget_4ep"} <= set(candidates) and len(candidates) > 20
    for row in candidates.values():
        assert recipe_script(RECIPES_DIR, row["base"]).is_file() and "measured" in row
        assert "{" not in candidate_flags(row)
    assert "face_detection_yunet" in candidate_flags(candidates["same_budget_facecrop"])  # {detector} filled in
    assert candidates["same_budget_freeze4"]["base"] == "same_budget_lite0"  # measured on lite0, runs on lite0


def test_candidates_alone_run_no_default_recipes(tmp_path, monkeypatch):
    """`bench_recipes.py --candidates X` runs X only (the reference and same_budget only when named or
    when no candidate is given): the missing-script error lists what it would have run."""
    bench_recipes = bench_module("bench_recipes", monkeypatch)
    if not (bench_recipes.UTKMASK / "eval_labels.csv").is_file() or not bench_recipes.WEIGHTS.is_file():
        pytest.skip("the shared benchmark data is not here")
    with pytest.raises(SystemExit, match="no recipe") as stop:
        bench_recipes.main(["--candidates", "same_budget_5ep", "--recipes_dir", str(tmp_path)])
    assert "reference.sh" not in str(stop.value) and str(stop.value).count(".sh") == 1
    with pytest.raises(SystemExit, match="reference.sh"):
        bench_recipes.main(["--recipes_dir", str(tmp_path)])

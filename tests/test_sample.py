"""sample.py: the command never writes into the bundled sample_data/ or over another folder, and the people
it draws do not look like one photo under two ids to the duplicate check."""
import subprocess
import sys

import pytest

from conftest import ROOT

import sample
from dataset import SAMPLE_DIR, duplicate_pairs, scan_people
from sample import make_sample


def snapshot(folder) -> dict:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


def test_the_command_without_its_folder_is_an_error_and_leaves_sample_data_alone():
    """The issue's `python sample.py --n_people 30` (OUT_DIR forgotten) used to rewrite sample_data/."""
    before = snapshot(SAMPLE_DIR)
    done = subprocess.run([sys.executable, str(ROOT / "sample.py"), "--n_people", "30"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].endswith("error: the following arguments are required: OUT_DIR")
    assert snapshot(SAMPLE_DIR) == before


@pytest.mark.parametrize("where", [".", "train", "train/images"])
def test_the_command_refuses_the_bundled_sample(where, monkeypatch):
    before = snapshot(SAMPLE_DIR)
    monkeypatch.chdir(ROOT)
    with pytest.raises(SystemExit) as refused:
        sample.main([f"sample_data/{where}", "--n_people", "1", "--n_eval_people", "0", "--size", "16", "16"])
    message = str(refused.value.code)
    assert message.startswith("error: ") and "\n" not in message and str(SAMPLE_DIR) in message
    assert snapshot(SAMPLE_DIR) == before


def test_the_command_refuses_a_folder_that_is_not_empty_or_a_file(tmp_path):
    used = tmp_path / "used"
    used.mkdir()
    (used / "notes.txt").write_text("mine")
    for target, says in ((used, "is not empty"), (used / "notes.txt", "is a file")):
        with pytest.raises(SystemExit) as refused:
            sample.main([str(target), "--n_people", "1", "--size", "16", "16"])
        message = str(refused.value.code)
        assert message.startswith("error: ") and "\n" not in message and f"{target} {says}" in message
    assert [p.name for p in used.iterdir()] == ["notes.txt"]


def test_the_command_writes_a_new_or_empty_folder(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    for name in ("empty", "new/sub"):
        out = sample.main([str(tmp_path / name), "--n_people", "6", "--n_eval_people", "1", "--size", "32", "24"])
        assert out == (tmp_path / name).resolve() and f"wrote {out}" in capsys.readouterr().out
        assert len(scan_people(out / "train")) == 6 * 7 and len(list((out / "eval" / "images").iterdir())) == 7


def test_the_commands_flags_are_whole_and_their_defaults_shown_once(capsys):
    with pytest.raises(SystemExit) as wrong:
        sample.main(["/tmp/never_written", "--n_p", "3"])
    assert wrong.value.code == 2 and "unrecognized arguments: --n_p" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        sample.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "OUT_DIR" in text and "sample_data/" in text and "python sample.py" in text
    for default in ("(default: 24)", "(default: 6)", "(default: [512, 384])", "(default: 0)"):
        assert text.count(default) == 1, default
    for flags, message in ((["--n_people", "0"], "--n_people must be at least 1"),
                           (["--size", "8", "8"], "--size must be at least 16")):
        with pytest.raises(SystemExit, match=message):
            sample.main(["/tmp/never_written", *flags])


@pytest.mark.parametrize("size,seed", [((512, 384), 0), ((128, 96), 5)])  # the command's; the learning test's
def test_sixty_generated_people_share_no_photo(tmp_path, size, seed):
    """The generated people used to look like one photo under two ids (9 pairs in `sample.py OUT
    --n_people 60`): every person's own backdrop, face place and features now set them apart."""
    table = scan_people(make_sample(tmp_path, n_people=60, n_eval_people=0, size=size, seed=seed) / "train")
    assert duplicate_pairs(table) == []

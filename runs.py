"""Run folders and the files several tools share: new run folders that never overwrite, atomic
writes, reading a run's config and checkpoint, and the probability file format."""
import argparse
import contextlib
import json
import os
import pickle
import re
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from dataset import DataWarning, read_csv_file, without_source_locations
from labels import HEADS, head_probs

UMASK = os.umask(0)
os.umask(UMASK)
PROB_COLUMNS = [f"p{i}" for i in range(18)]
HEAD_COLUMNS = [f"{head}_p{i}" for head, n in HEADS.items() for i in range(n)]


def new_run_dir(model_dir, name, suffixes=("",)) -> str:
    """Create and return the first free name of `name`, `name2`, `name3`, ... for which every
    `model_dir/<name><suffix>` is new (one name for all folds); folders are created exclusively."""
    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    for n in range(1, 100000):
        candidate = name if n == 1 else f"{name}{n}"
        if any((model_dir / f"{candidate}{s}").exists() for s in suffixes):
            continue
        try:
            for suffix in suffixes:
                (model_dir / f"{candidate}{suffix}").mkdir()
            return candidate
        except FileExistsError:
            continue
    raise RuntimeError(f"no free run name for {name} under {model_dir}")


def atomic_write(path, write):
    """Call `write(tmp_path)`, then rename the temporary file onto `path`: `path` is the old file or
    the new one, never a part. A failing write (a full disk) raises OSError naming `path`."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~UMASK)
        os.replace(tmp, path)
    except OSError as error:
        raise OSError(error.errno, f"could not write {path}: {error.strerror or error}") from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Every flag's default shown once: "(default: ...)" is added where the help does not already say what
    the default is (and never for None, which the help explains); examples in the epilog keep their lines."""

    def _get_help_string(self, action):
        if "default" in (action.help or "").lower() or action.default is None:
            return action.help
        return super()._get_help_string(action)


def tool_parser(doc, **kwargs) -> argparse.ArgumentParser:
    """A tool's parser: its module docstring's first paragraph as the description and the rest (the usage
    examples) as the epilog, no abbreviated flags (`--model` is not `--model_dir`), defaults shown once."""
    description, _, examples = doc.strip().partition("\n\n")
    return argparse.ArgumentParser(description=" ".join(description.split()), epilog=examples or None,
                                   formatter_class=HelpFormatter, allow_abbrev=False, **kwargs)


def run_command(main):
    """Run a tool's `main()` as a command: Ctrl-C ends it with one line (the interrupt's own message, e.g.
    what train.py saved) and exit status 130, the shell's for SIGINT, instead of a traceback."""
    try:
        main()
    except KeyboardInterrupt as interrupt:
        if os.environ.get("MASKTRAIN_TRACEBACK"):
            raise
        print(f"\n{str(interrupt) or 'interrupted'}", file=sys.stderr)
        raise SystemExit(130) from None


def one_line(error) -> str:
    """An error as one line for the user: a loader worker's original error rather than its traceback,
    and no library source locations (e.g. torchvision's `/__w/vision/.../decode_jpeg.cpp:171`)."""
    text = str(error)
    if "Original Traceback" in text:
        text = [line for line in text.splitlines() if line.strip()][-1]
        text = re.sub(r"^[\w.]+(Error|Exception): ", "", text.strip())
    return without_source_locations(re.sub(r"^\[Errno \d+\] ", "", text))


@contextlib.contextmanager
def one_line_errors(*more):
    """Turn the user's errors raised in the block (bad files, flags and values: ValueError, OSError,
    RuntimeError and `more`) into `error: <one line>` on stderr and exit status 1, and data-folder
    warnings into `warning: <one line>`; MASKTRAIN_TRACEBACK=1 shows the traceback instead."""
    default_format = warnings.formatwarning

    def format_warning(message, category, filename, lineno, line=None):
        if issubclass(category, DataWarning):
            return f"warning: {message}\n"
        return default_format(message, category, filename, lineno, line)

    warnings.formatwarning = format_warning
    try:
        yield
    except (ValueError, OSError, RuntimeError, *more) as error:
        if os.environ.get("MASKTRAIN_TRACEBACK"):
            raise
        raise SystemExit(f"error: {one_line(error)}") from None
    finally:
        warnings.formatwarning = default_format


def write_json(path, data):
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(data, indent=2, default=str)))


def write_csv(path, frame: pd.DataFrame):
    atomic_write(path, lambda tmp: frame.to_csv(tmp, index=False))


def save_checkpoint(path, state):
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def remove_stale_temporaries(run_dir):
    """Delete the temporary files of writes that a killed process left behind."""
    for tmp in Path(run_dir).glob(".*.tmp"):
        tmp.unlink(missing_ok=True)


def check_run(run_dir, checkpoint="best") -> Path:
    """The run folder, after checking it holds config.json and `<checkpoint>.pth`."""
    run_dir = Path(run_dir)
    for name in ("config.json", f"{checkpoint}.pth"):
        if not (run_dir / name).is_file():
            raise FileNotFoundError(f"run folder {run_dir} has no {name}: is it a finished train.py run?")
    return run_dir


def read_json(path) -> dict:
    """A JSON file; a damaged one is an error that names it."""
    try:
        return json.loads(Path(path).read_text())
    except ValueError as error:  # a JSONDecodeError or a UnicodeDecodeError
        raise ValueError(f"{path} is damaged or not JSON ({error})") from None


def read_folds(path) -> list:
    """The fold run folders a k-fold run's `<name>_cv.json` lists."""
    try:
        return [Path(folder) for folder in json.loads(Path(path).read_text())["folds"]]
    except (ValueError, KeyError, TypeError):  # not JSON, or JSON without a list of folds
        raise ValueError(f"{path}: not a train.py <name>_cv.json (it lists the fold run folders)") from None


def read_config(run_dir, checkpoint="best") -> dict:
    """A train.py run's config.json, of any version (spec.RunSpec.of reads it); a run folder of another
    tool (the competition baseline's) is a one-line ForeignRunError."""
    return checked_config(read_json(check_run(run_dir, checkpoint) / "config.json"), run_dir)


class ForeignRunError(ValueError):
    """A folder with config.json and a checkpoint that this toolkit did not write (the baseline's)."""


def checked_config(config, run_dir) -> dict:
    """`config` where it is a train.py run's, of any version (spec.RunSpec.of reads it, converting an older
    one); a config.json without this toolkit's records (`heads`, `preprocessing`: the competition
    baseline's is `vars(args)` alone) is a ForeignRunError."""
    if not isinstance(config, dict) or not {"heads", "preprocessing", "kind", "model"} <= set(config):
        raise ForeignRunError(f"{run_dir} is not a run of this toolkit (its config.json lacks the model record "
                              "train.py writes: the competition baseline's or another tool's run folder?); train "
                              "one with train.py")
    return config


def is_run_folder(run_dir, checkpoint="best") -> bool:
    """Whether `run_dir` holds a train.py run (of any version) with `<checkpoint>.pth`."""
    try:
        read_config(run_dir, checkpoint)
    except (OSError, ValueError):
        return False
    return True


def load_checkpoint(path, map_location="cpu") -> dict:
    """A checkpoint written by train.py; a damaged or truncated file is an error that names it."""
    try:
        return torch.load(path, map_location=map_location, weights_only=False)
    except (RuntimeError, EOFError, ValueError, OSError, pickle.UnpicklingError) as error:
        detail = without_source_locations(str(error).split(". ")[0].splitlines()[0]) or type(error).__name__
        raise ValueError(f"{path} is damaged or not a train.py checkpoint ({detail})") from None


def read_run(run_dir, checkpoint="best"):
    """(config, checkpoint state) of a run folder, with clear errors for missing files. The state's
    `model` is the weights the run scores: for last.pth of an --ema run, the moving average (as in best.pth)."""
    config = read_config(run_dir, checkpoint)
    path = Path(run_dir) / f"{checkpoint}.pth"
    state = load_checkpoint(path)
    if not isinstance(state, dict) or "model" not in state:
        raise ForeignRunError(f"{path} is not a train.py checkpoint (no model record in it)")
    return config, {**state, "model": state["ema"]} if state.get("ema") is not None else state


def probability_frame(image_ids, probs: np.array) -> pd.DataFrame:
    """The shared probability file: ImageID, pred (argmax class), p0..p17, and the per-head
    marginals mask_p0..2, gender_p0..1, age_p0..2."""
    heads = np.concatenate(list(head_probs(probs).values()), axis=1)
    frame = pd.DataFrame(np.concatenate([probs, heads], axis=1), columns=PROB_COLUMNS + HEAD_COLUMNS)
    frame.insert(0, "pred", probs.argmax(1))
    frame.insert(0, "ImageID", list(image_ids))
    return frame


def read_probabilities(path) -> pd.DataFrame:
    """A probability file (ImageID and p0..p17 are required); errors name the file."""
    frame = read_csv_file(path, "a probability CSV", dtype={"ImageID": str})
    class_columns = [c for c in frame if re.fullmatch(r"p\d+", c)]
    if "ImageID" not in frame or sorted(class_columns) != sorted(PROB_COLUMNS):
        raise ValueError(f"{path}: a probability file needs ImageID and p0..p17, it has "
                         f"{'an' if 'ImageID' in frame else 'no'} ImageID and {len(class_columns)} class columns")
    if frame["ImageID"].duplicated().any():
        raise ValueError(f"{path}: ImageID values repeat")
    probs = frame[PROB_COLUMNS].apply(pd.to_numeric, errors="coerce").to_numpy()
    wrong = ~np.isfinite(probs).all(1) | (probs < 0).any(1) | (np.abs(np.nan_to_num(probs).sum(1) - 1) > 0.01)
    if wrong.any():
        row = int(np.flatnonzero(wrong)[0])
        raise ValueError(f"{path}: {int(wrong.sum())} rows of p0..p17 are not probabilities (numbers >= 0 that sum to "
                         f"1), e.g. ImageID {frame['ImageID'].iloc[row]}")
    return frame

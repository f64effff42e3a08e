"""See a run: its page (`report.html`, run_page.py) with where each head looks, or a comparison of several
runs (k-fold runs as one entry with their spread).

examples:
  python report.py model/exp                     # -> model/exp/report.html (train.py writes it too)
  python report.py model/exp model/exp2 model/cv_cv.json --out compare.html
"""
import json
from pathlib import Path

import numpy as np
import pandas as pd

from labels import class_name
from run_page import class_scores, curves_figure, load_run, missing, page, table_html, write_report
from runs import atomic_write, one_line_errors, read_folds, run_command, tool_parser


def entry(item) -> dict:
    """A run folder, or a `<name>_cv.json` as one entry: fold curves averaged, per-class F1 over folds."""
    item = Path(item)
    if item.suffix == ".json":
        folds = [load_run(p) for p in read_folds(item)]
        logs = pd.concat([f["log"] for f in folds]).groupby("epoch", as_index=False).mean(numeric_only=True)
        f1s = [class_scores(f["probs"])["f1"] for f in folds if f["probs"] is not None]
        return dict(name=item.stem, config=folds[0]["config"], log=logs, folds=len(folds),
                    class_f1=pd.concat(f1s, axis=1) if f1s else None,
                    best=[f["log"]["val_f1"].max() for f in folds])
    run = load_run(item)
    return dict(name=run["name"], config=run["config"], log=run["log"], folds=1, best=[run["log"]["val_f1"].max()],
                class_f1=class_scores(run["probs"])[["f1"]] if run["probs"] is not None else None)


def per_class_f1(entry) -> pd.Series:
    """'0.812' per class, or '0.812 ± 0.031' (mean and spread over folds); '-' without val_probs.csv."""
    if entry["class_f1"] is None:
        return pd.Series(["-"] * 18)
    text = entry["class_f1"].mean(axis=1).map("{:.3f}".format).reset_index(drop=True)
    if entry["folds"] > 1:
        text += " ± " + entry["class_f1"].std(axis=1).map("{:.3f}".format).reset_index(drop=True)
    return text


def compare_report(items) -> str:
    entries = [entry(item) for item in items]
    keys = sorted(set().union(*(e["config"] for e in entries)) - {"run_dir", "fold", "git_commit", "versions",
                                                                    "preprocessing", "changed_flags", "name"})
    differ = [k for k in keys if len({json.dumps(e["config"].get(k), sort_keys=True) for e in entries}) > 1]
    settings = pd.DataFrame({e["name"]: [json.dumps(e["config"].get(k)) for k in differ] for e in entries},
                            index=pd.Index(differ, name="setting that differs"))
    best = pd.DataFrame({"best val F1 (mean)": [np.mean(e["best"]) for e in entries],
                         "spread (std over folds)": [np.std(e["best"]) for e in entries],
                         "folds": [e["folds"] for e in entries]}, index=pd.Index([e["name"] for e in entries],
                                                                                 name="run"))
    per_class = pd.DataFrame({e["name"]: per_class_f1(e).to_numpy() for e in entries},
                             index=pd.Index([f"{c}: {class_name(c)}" for c in range(18)], name="class"))
    differences = table_html(settings) if differ else missing("no setting differs")
    sections = [("settings", table_html(best) + "<br>" + differences),
                ("curves", curves_figure(entries)), ("classes", table_html(per_class))]
    return page(f"Comparison of {len(entries)} runs", sections)


def main(argv=None):
    parser = tool_parser(__doc__)
    parser.add_argument("runs", nargs="+", help="run folders or <name>_cv.json files")
    parser.add_argument("--out", default=None, help="several runs: the comparison file (default: compare.html "
                        "beside the first run)")
    parser.add_argument("--no_cams", action="store_true", help="leave out the class activation maps")
    args = parser.parse_args(argv)
    with one_line_errors():
        if len(args.runs) == 1 and not args.runs[0].endswith(".json"):
            path = write_report(args.runs[0], cams=not args.no_cams)
        else:
            path = Path(args.out or Path(args.runs[0]).parent / "compare.html")
            text = compare_report(args.runs)
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(path, lambda tmp: Path(tmp).write_text(text))
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    run_command(main)

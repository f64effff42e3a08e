"""Search train.py's settings with Optuna: every trial is a normal run folder, the study lives in a
database (SQLite in model_dir by default: running the same command again resumes it; a shared
PostgreSQL URL lets several machines work on one study).

    python search.py space.yaml --trials 20 -- --model efficientnet_lite0 --epochs 3
    python search.py space.yaml --storage postgresql://user:pw@host/db -- ...   # on every machine

space.yaml: `lr: [1e-3, 3e-4]` (a grid when every entry is a list) or `lr: {low: 1e-5, high: 1e-2,
log: true}` (sampled; lists are then categorical).
"""
import argparse
import contextlib
import io
import itertools
import json
import os
import sys
import time
import warnings
from pathlib import Path

import optuna
import pandas as pd
import yaml
from optuna.trial import TrialState

import train
from runs import atomic_write, one_line, write_csv

optuna.logging.set_verbosity(optuna.logging.WARNING)
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)  # heartbeats, matplotlib plots
warnings.filterwarnings("ignore", message="Target and region quantiles", category=UserWarning)  # tiny studies


RETRY = getattr(optuna.storages, "RetryHeartbeatStaleTrialCallback", optuna.storages.RetryFailedTrialCallback)


class SearchError(Exception):
    """A bad space file, flag or storage, reported as one line before any training."""


class GridPointTaken(Exception):
    """Another process took the last grid point between our look and our ask."""


def flag_argv(name, value) -> list:
    """train.py arguments setting flag `name` to `value` (bools toggle store_true flags; lists fill
    nargs flags)."""
    action = next(a for a in train.build_parser()._actions if a.dest == name)
    if action.nargs == 0:
        return [f"--{name}"] if value else []
    values = value if isinstance(value, list) else [value]
    return [f"--{name}", *map(str, values)]


def check_flags(argv, where):
    """Parse and validate train.py flags; raise SearchError naming `where` with train.py's reason."""
    messages = io.StringIO()
    try:
        with contextlib.redirect_stderr(messages):
            parsed = train.parse_args(argv)
            train.validate(parsed)
    except SystemExit as error:
        lines = messages.getvalue().strip().splitlines() or [str(error.code)]
        raise SearchError(f"{where}: {lines[-1].split('error: ', 1)[-1]}") from None
    except train.FlagError as error:
        raise SearchError(f"{where}: {error}") from None
    if not train.has_validation(parsed):
        raise SearchError(f"{where}: --val_ratio 0 leaves no validation to score the trials on")


def read_space(path, fixed) -> dict:
    """{flag: list of values | {low, high, log}} from a YAML file, every value checked by train.py."""
    path = Path(path)
    if not path.is_file():
        raise SearchError(f"space file not found: {path}")
    try:
        space = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        raise SearchError(f"{path}: not valid YAML ({one_line(error)})") from None
    if not space or not isinstance(space, dict):
        raise SearchError(f"{path}: the search space is empty (write e.g. `lr: [1e-3, 3e-4]`)")
    flags = {a.dest for a in train.build_parser()._actions} - {"help", "config", "resume", "name", "model_dir"}
    for name, values in space.items():
        if name not in flags:
            raise SearchError(f"{path}: unknown train.py flag {name!r}")
        if isinstance(values, dict):
            if not {"low", "high"} <= set(values) or set(values) - {"low", "high", "log"}:
                raise SearchError(f"{path}: {name}: a range needs low and high (and optionally log)")
            if not values["low"] < values["high"]:
                raise SearchError(f"{path}: {name}: low must be below high")
            samples = [values["low"], values["high"]]
        elif isinstance(values, list) and values:
            samples = values
        else:
            raise SearchError(f"{path}: {name}: give a non-empty list of values or {{low: .., high: ..}}")
        for value in samples:
            check_flags(fixed + flag_argv(name, value), f"{path}: {name}={value!r}")
    return space


def grid_points(space) -> list:
    """Every combination of a space of lists, as {flag: json-encoded value}."""
    names = list(space)
    return [dict(zip(names, map(json.dumps, combo), strict=True))
            for combo in itertools.product(*(space[n] for n in names))]


def suggest(trial, space) -> dict:
    """The trial's values: categorical for lists (json-encoded, so that lists and bools fit), float or
    int ranges."""
    values = {}
    for name, spec in space.items():
        if isinstance(spec, list):
            values[name] = json.loads(trial.suggest_categorical(name, [json.dumps(v) for v in spec]))
        elif isinstance(spec["low"], int) and isinstance(spec["high"], int):
            values[name] = trial.suggest_int(name, spec["low"], spec["high"], log=bool(spec.get("log")))
        else:
            values[name] = trial.suggest_float(name, float(spec["low"]), float(spec["high"]), log=bool(spec.get("log")))
    return values


def serialized_sqlite(storage) -> None:
    """Every transaction of an SQLite `storage` begins with BEGIN IMMEDIATE (SQLite's write lock first).
    Python's sqlite3 begins a transaction at its first write, not its first read, so two processes could
    both read one waiting trial (a grid point) and both claim it in optuna's check-then-set: the trial ran
    twice and the second tell failed ("Cannot tell a COMPLETE trial"). SQLAlchemy's recipe for pysqlite."""
    from sqlalchemy import event

    @event.listens_for(storage.engine, "connect")
    def no_implicit_begin(dbapi_connection, _record):
        dbapi_connection.isolation_level = None

    @event.listens_for(storage.engine, "begin")
    def begin_immediate(connection):
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    storage.engine.dispose()  # a connection opened before the listeners opens again with them


def open_study(args, space, fixed):
    """Load or create the study; the process that creates it records its settings (see `settings`) and
    queues every grid point of a grid study once. A study made with other settings, or by a search.py that
    kept no record of them, is refused rather than resumed."""
    sqlite = args.storage.startswith("sqlite")  # several processes on one SQLite file wait for its lock
    for attempt in range(5):  # processes starting together race to create the tables: the loser retries
        try:
            storage = optuna.storages.RDBStorage(
                args.storage, engine_kwargs={"connect_args": {"timeout": 120}} if sqlite else None,
                heartbeat_interval=max(1, args.grace_period // 3), grace_period=args.grace_period,
                heartbeat_stale_trial_callback=RETRY(max_retry=3))
            if sqlite:
                serialized_sqlite(storage)
            break
        except Exception as error:
            if attempt == 4:
                raise SearchError(f"--storage: cannot open {args.storage}: {one_line(error)}") from None
            time.sleep(0.2 * (attempt + 1))
    is_grid = all(isinstance(v, list) for v in space.values())
    wanted = settings(args, space, fixed)
    try:
        study = optuna.create_study(study_name=args.study, storage=storage, direction="maximize",
                                    pruner=pruner(args))
        created = True
    except optuna.exceptions.DuplicatedStudyError:
        study = optuna.load_study(study_name=args.study, storage=storage, pruner=pruner(args))
        created = False
    if created:
        record_settings(study, wanted)
    else:
        check_settings(study, wanted, args)
    if is_grid:
        points = grid_points(space)
        if created:
            for point in points:
                study.enqueue_trial(point, user_attrs={"grid_point": True})
            study.set_user_attr("grid_size", len(points))
        else:
            deadline = time.time() + 30
            while "grid_size" not in study.user_attrs and time.time() < deadline:
                time.sleep(0.5)
            if "grid_size" not in study.user_attrs:  # its creator died while queueing
                for point in points:
                    study.enqueue_trial(point, user_attrs={"grid_point": True}, skip_if_exists=True)
                study.set_user_attr("grid_size", len(points))
    return study, is_grid


# train.py flags that say where a run's files and logs go or how many loader processes it uses, not what a trial
# trains: they may differ between the machines (or runs) of one study
LOCAL_FLAGS = {"config", "name", "resume", "model_dir", "num_workers", "cache_dir", "log_interval", "report",
               "wandb", "wandb_project", "wandb_entity", "wandb_name", "wandb_mode", "wandb_group"}


def as_json(value):
    """`value` as it reads back from the study's storage (user attrs are stored as JSON)."""
    return json.loads(json.dumps(value, default=str))


def settings(args, space, fixed) -> dict:
    """What a trial of this command means, as recorded in the study's user attrs: every train.py setting
    of the fixed flags (after --config and defaults; LOCAL_FLAGS left out), the search space, and the pruner."""
    flags = {k: v for k, v in vars(train.parse_args(fixed)).items() if k not in LOCAL_FLAGS}
    return as_json({"fixed_flags": flags, "space": space,
                    "pruner": {"prune": args.prune, "prune_startup": args.prune_startup if args.prune else None}})


def record_settings(study, wanted):
    for key in ("fixed_flags", "pruner", "space"):  # space last: a loader waits for it (check_settings)
        study.set_user_attr(key, wanted[key])


def shown(value) -> str:
    """A flag's value as a command line gives it."""
    if isinstance(value, bool):
        return "on" if value else "off"
    if value is None:
        return "unset"
    if isinstance(value, list):
        return " ".join(map(str, value)) or "none"
    return str(value)


def differences(wanted, stored) -> list:
    """The settings of this command that differ from the ones the study recorded, e.g. `--epochs 5 (study: 3)`."""
    found = []
    defaults = {a.dest: a.default for a in train.build_parser()._actions}
    for name, value in wanted["fixed_flags"].items():
        if name not in stored["fixed_flags"]:  # a flag newer than the study: fine at its default
            if value != as_json(defaults.get(name)):
                found.append(f"--{name} {shown(value)} (study: made before the flag existed)")
        elif value != stored["fixed_flags"][name]:
            found.append(f"--{name} {shown(value)} (study: {shown(stored['fixed_flags'][name])})")
    old, new = stored["space"], wanted["space"]
    for name in [*new, *(n for n in old if n not in new)]:
        if name not in old:
            found.append(f"space: {name} added")
        elif name not in new:
            found.append(f"space: {name} removed")
        elif new[name] != old[name]:
            kind = "range" if isinstance(new[name], dict) and isinstance(old[name], dict) else "values"
            found.append(f"space: {name} {kind} {json.dumps(new[name])} (study: {json.dumps(old[name])})")
    both_prune = wanted["pruner"]["prune"] and stored["pruner"].get("prune")
    for name, value in wanted["pruner"].items():
        if value != stored["pruner"].get(name) and (name == "prune" or both_prune):
            found.append(f"--{name} {shown(value)} (study: {shown(stored['pruner'].get(name))})")
    return found


def check_settings(study, wanted, args):
    """Refuse a study whose recorded settings differ from this command's. Its creator records them right
    after creating it: a study without them and without trials is waited for (30 s), then taken over
    (its creator died); one with trials but no record was made by an older search.py."""
    deadline = time.time() + 30
    while "space" not in study.user_attrs and not study.get_trials(deepcopy=False) and time.time() < deadline:
        time.sleep(0.5)
    stored = study.user_attrs
    if "space" not in stored:
        if study.get_trials(deepcopy=False) or "grid_size" in stored:
            raise SearchError(f"study {args.study!r} has no record of the settings it was made with (an older "
                              f"search.py made it): pass --study NAME to start a new study")
        record_settings(study, wanted)
        return
    found = differences(wanted, stored)
    if found:
        more = f" and {len(found) - 3} more" if len(found) > 3 else ""
        raise SearchError(f"study {args.study!r} was made with other settings: {'; '.join(found[:3])}{more}; "
                          f"pass --study NAME to start a new study, or the study's settings to resume it")


def pruner(args):
    if not args.prune:
        return optuna.pruners.NopPruner()
    return optuna.pruners.MedianPruner(n_startup_trials=args.prune_startup, n_warmup_steps=0)


def counted(trial) -> bool:
    """Trials that count towards --trials: finished, pruned, or crashed with an error of their own
    (not the stale ones of a killed process, which are retried)."""
    return trial.state in (TrialState.COMPLETE, TrialState.PRUNED) or (
        trial.state == TrialState.FAIL and "error" in trial.user_attrs)


def objective(args, space, fixed, is_grid):
    def run_trial(trial):
        if is_grid and "grid_point" not in trial.user_attrs:
            trial.set_user_attr("unused", "the grid point was taken by another process")
            raise GridPointTaken
        values = suggest(trial, space)
        name = f"{args.study}_t{trial.number}"
        argv = fixed + [a for flag, value in values.items() for a in flag_argv(flag, value)] + ["--name", name]
        if args.wandb_group:
            argv += ["--wandb_group", args.study]
        trial.set_user_attr("run_dir", str(Path(args.model_dir) / name))
        print(f"trial {trial.number}: {' '.join(f'{k}={v}' for k, v in values.items())}", flush=True)

        def report(epoch, row, fold):
            step = (fold or 0) * 1000 + epoch
            trial.report(row["val_f1"], step)
            if trial.should_prune():
                raise optuna.TrialPruned(f"val F1 {row['val_f1']:.4f} behind the median at epoch {epoch}")

        try:
            scores = train.main(argv, on_epoch=report)
        except SystemExit as error:
            trial.set_user_attr("error", str(error.code))
            raise TrialCrashed(str(error.code)) from None
        except (optuna.TrialPruned, KeyboardInterrupt):
            raise
        except Exception as error:
            trial.set_user_attr("error", f"{type(error).__name__}: {one_line(error)}")
            raise TrialCrashed(one_line(error)) from None
        return float(sum(scores) / len(scores))
    return run_trial


class TrialCrashed(Exception):
    """A trial's train.py run failed; recorded as failed with its error line, the search goes on."""


def search(args, space, fixed):
    study, is_grid = open_study(args, space, fixed)
    n_trials = study.user_attrs["grid_size"] if is_grid and args.trials is None else args.trials or 20
    run_trial = objective(args, space, fixed, is_grid)
    while True:
        optuna.storages.fail_stale_trials(study)
        trials = study.get_trials(deepcopy=False)
        done = sum(counted(t) for t in trials)
        waiting = any(t.state == TrialState.WAITING for t in trials)
        running = sum(t.state == TrialState.RUNNING for t in trials)
        if done >= n_trials:
            break
        if not waiting and (is_grid or done + running >= n_trials):
            if not running:
                break
            time.sleep(min(2, args.grace_period / 2))  # other processes' trials, or a killed one going stale
            continue
        study.optimize(run_trial, n_trials=1, catch=(TrialCrashed, GridPointTaken))
        write_results(study, args)
    write_results(study, args, plots=True)
    return study


def best_row(run_dir):
    """The per-head accuracies of a run's best epoch (from log.csv), where it has one."""
    log = Path(run_dir) / "log.csv"
    if not log.is_file():
        return {}
    frame = pd.read_csv(log)
    best = frame.loc[frame["val_f1"].idxmax()]
    return {f"{h}_acc": round(float(best[f"val_{h}_acc"]), 4) for h in ("mask", "gender", "age")}


def write_results(study, args, plots=False):
    """`<study>_results.csv` and `.md` (sorted by F1) in model_dir; with `plots`, the optimisation
    history and parameter importances as PNGs once there are enough finished trials."""
    rows = []
    for trial in study.get_trials(deepcopy=False):
        if trial.state == TrialState.WAITING or "unused" in trial.user_attrs:
            continue
        params = {k: (json.loads(v) if isinstance(v, str) else v) for k, v in trial.params.items()}
        minutes = (trial.duration.total_seconds() / 60) if trial.duration else None
        rows.append(dict(trial=trial.number, **params, f1=trial.value, state=trial.state.name.lower(),
                         **best_row(trial.user_attrs.get("run_dir", "")),
                         minutes=round(minutes, 2) if minutes is not None else None,
                         run_dir=trial.user_attrs.get("run_dir", ""), error=trial.user_attrs.get("error", "")))
    if not rows:
        return
    frame = pd.DataFrame(rows).sort_values("f1", ascending=False, na_position="last")
    base = Path(args.model_dir) / f"{args.study}_results"
    write_csv(base.with_suffix(".csv"), frame)
    table = frame.drop(columns=["error"]) if not frame["error"].astype(bool).any() else frame
    lines = ["| " + " | ".join(table.columns) + " |", "|" + " --- |" * len(table.columns)]
    lines += ["| " + " | ".join("" if pd.isna(v) else f"{v:.4f}" if isinstance(v, float) else str(v) for v in row)
              + " |" for row in table.itertuples(index=False)]
    atomic_write(base.with_suffix(".md"), lambda tmp: Path(tmp).write_text("\n".join(lines) + "\n"))
    if plots:
        save_plots(study, args)


def save_plots(study, args):
    complete = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]
    if len(complete) < 2:
        return
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as plots
    for name, plot in (("history", plots.plot_optimization_history), ("importances", plots.plot_param_importances)):
        try:
            axes = plot(study)
            axes.figure.tight_layout()
            axes.figure.savefig(Path(args.model_dir) / f"{args.study}_{name}.png", dpi=80)
            plt.close(axes.figure)
        except (ValueError, RuntimeError) as error:  # e.g. importances of a parameter that never varied
            print(f"note: no {name} plot ({one_line(error)})")


def print_top(study, args):
    complete = sorted((t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE),
                      key=lambda t: t.value, reverse=True)
    if not complete:
        print("no finished trial yet")
        return
    best = complete[0]
    print(f"best: trial {best.number}, F1 {best.value:.4f}, {best.user_attrs.get('run_dir')}")
    if args.top:
        runs = " ".join(t.user_attrs["run_dir"] for t in complete[: args.top])
        print(f"ensemble the {min(args.top, len(complete))} best: python ensemble.py {runs} --method soft")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every flag's default once: a help text that explains it already gets no `(default: None)`."""

    def _get_help_string(self, action):
        return action.help if "(default:" in (action.help or "") else super()._get_help_string(action)


def build_parser():
    parser = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()),
                                     usage="python search.py SPACE.yaml [options] -- [fixed train.py flags]",
                                     formatter_class=HelpFormatter, allow_abbrev=False)
    parser.add_argument("space", help="YAML search space over train.py flags")
    parser.add_argument("--trials", type=int, default=None,
                        help="trials in the study, all processes together (default: the whole grid, or 20)")
    parser.add_argument("--study", default=None,
                        help="study name; a study remembers its space, fixed flags and pruner, and refuses other "
                             "ones (default: the space file's name)")
    parser.add_argument("--storage", default=None, help="SQLAlchemy URL (default: sqlite in model_dir)")
    parser.add_argument("--prune", action="store_true", help="stop trials behind the median after an epoch")
    parser.add_argument("--prune_startup", type=int, default=2, help="finished trials before pruning starts")
    parser.add_argument("--grace_period", type=int, default=60,
                        help="seconds without a heartbeat after which a running trial is failed and retried")
    parser.add_argument("--top", type=int, default=0, help="print the command ensembling the K best trials")
    return parser


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    own, fixed = (argv[: argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    args = build_parser().parse_args(own)
    try:
        check_flags(fixed, "fixed flags after --")
        fixed_args = train.parse_args(fixed)
        args.model_dir, args.wandb_group = fixed_args.model_dir, fixed_args.wandb
        if fixed_args.resume:
            raise SearchError("--resume cannot be a fixed flag of a search")
        args.study = args.study or Path(args.space).stem
        space = read_space(args.space, fixed)
        Path(args.model_dir).mkdir(parents=True, exist_ok=True)
        args.storage = args.storage or f"sqlite:///{Path(args.model_dir).resolve() / args.study}.db"
        study = search(args, space, fixed)
    except SearchError as error:
        raise SystemExit(f"error: {error}") from None
    print_top(study, args)
    return study


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()

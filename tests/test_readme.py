"""The READMEs and docs/ stay true: the quick start runs as written, every flag they show exists where
they show it, and every flag of train.py is documented in docs/training.md."""
import importlib
import itertools
import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = (ROOT / "README.md", ROOT / "benchmarks" / "README.md", *sorted((ROOT / "docs").glob("*.md")))
FLAG = r"(?<![\w-])--[a-z][\w-]*"
NOT_OURS = {"--help", "--nproc_per_node", "--dist", "--durations", "--index-url"}  # argparse, torchrun, pytest, pip


def shown_commands(text):
    """(script, flags) of each `python X.py ...` command of the text's code blocks and of each inline
    `X.py --flag ...`; flags after ` -- ` (search.py passes them to train.py) are train.py's."""
    lines = [line for block in re.findall(r"```(?:bash|sh)?\n(.*?)```", text, re.S)
             for line in re.sub(r"\\\n\s*", " ", block).splitlines()]
    lines += re.findall(r"`([^`\n]*\.py [^`\n]*)`", text)
    for line in lines:
        for part in re.split(r"&&|\|\||;|\|", line.split(" #")[0]):
            found = re.search(r"(?:python (?:-m )?)?([\w/]+\.py)(.*)", part)
            if found:
                own, _, passed = found.group(2).partition(" -- ")
                yield found.group(1), re.findall(FLAG, own)
                if passed:
                    yield "train.py", re.findall(FLAG, passed)


FLAGS_ELSEWHERE = {"train.py": ("flags.py",),  # train.py's parser lives in flags.py
                   "inference.py": ("faces.py",), "ensemble.py": ("inference.py", "faces.py")}  # the face flags


def script_source(doc, name):
    """The source that defines the flags of a script a README names: from the project root, else in
    benchmarks/."""
    for path in (ROOT / name, ROOT / "benchmarks" / name):
        if path.is_file():
            return path.read_text() + "".join((path.parent / other).read_text()
                                              for other in FLAGS_ELSEWHERE.get(name, ()))
    raise AssertionError(f"{doc.name} shows {name}, which does not exist")


def test_every_flag_on_a_shown_command_line_is_that_scripts():
    unknown, checked = [], 0
    for doc in DOCS:
        for name, flags in shown_commands(doc.read_text()):
            text = script_source(doc, name)
            unknown += [f"{doc.name}: {name} {flag}" for flag in flags
                        if f'"{flag}"' not in text and flag not in NOT_OURS]
            checked += 1
    assert checked >= 20 and not unknown, unknown


def test_every_flag_the_readmes_name_exists_in_some_script():
    sources = "".join(path.read_text() for pattern in ("*.py", "benchmarks/*.py") for path in ROOT.glob(pattern))
    named = {flag for doc in DOCS for span in re.findall(r"`([^`\n]+)`", doc.read_text())
             for flag in re.findall(FLAG, span)} - NOT_OURS
    assert len(named) > 50 and not sorted(f for f in named if f'"{f}"' not in sources)


def test_every_train_flag_is_in_the_training_doc():
    import flags
    text = (ROOT / "docs" / "training.md").read_text()
    options = [a.option_strings[-1] for a in flags.build_parser()._actions if a.option_strings and a.dest != "help"]
    assert len(options) > 60 and not [o for o in options if f"`{o}" not in text]


def test_the_readme_is_short_and_starts_with_what_a_newcomer_needs():
    text = (ROOT / "README.md").read_text()
    first_screens = "\n".join(text.splitlines()[:60])
    assert len(text.splitlines()) <= 160
    assert all(part in first_screens for part in ("pip install -r requirements.txt", "python train.py",
                                                  "python inference.py", "--amp auto", "gpu_check.md"))


SHORT_TRAINING = ["--epochs", "1", "--resize", "32", "24"]
FAST_TRAINING = [*SHORT_TRAINING, "--model", "test_resnet", "--pretrained", "none", "--amp", "off", "--report",
                 "off", "--num_workers", "0"]


def run_block(block, folder, cut=SHORT_TRAINING):
    """Run a shell block of the docs as written in `folder`, each `python X.py ARGS` as X.main(ARGS) in
    this process; `cut` added to train.py's lines (and to search.py's flags for its trials, after ` -- `);
    a `cat > FILE <<'END'` here-document written as FILE; comment lines skipped. Each `-> PATH ...` of a
    line's comment (up to a bracket) must exist afterwards."""
    lines = iter(block.splitlines())
    ran = 0
    for line in lines:
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        heredoc = re.fullmatch(r"cat > (\S+) <<'(\w+)'", line.strip())
        if heredoc:
            body = [text for text in iter(lambda: next(lines), heredoc.group(2))]
            (folder / heredoc.group(1)).write_text("\n".join(body) + "\n")
            continue
        command, _, comment = line.partition(" #")
        python, script, *args = shlex.split(command)
        assert python == "python" and script.endswith(".py"), line
        if script == "train.py" or (script == "search.py" and "--" in args):
            args += cut
        importlib.import_module(script[:-3]).main(args)
        ran += 1
        for written in itertools.takewhile(lambda word: not word.startswith("("), comment.partition("-> ")[2].split()):
            assert (folder / written).exists(), f"{line}: {written} was not written"
    return ran


def bash_blocks(text) -> list:
    return re.findall(r"```bash\n(.*?)```", text, re.S)


def in_a_sample_folder(folder, monkeypatch):
    """`folder` as the project's working folder: the bundled sample_data linked in, the current directory
    (the face detector is found in the project's weights/ from any folder)."""
    (folder / "sample_data").symlink_to(ROOT / "sample_data")
    monkeypatch.chdir(folder)


def test_the_quick_start_runs_as_written_and_writes_what_it_says(tmp_path, monkeypatch):
    """The README's quick start, line by line, from a folder with the project's sample_data (its default
    paths: sample_data, model/, output/)."""
    text = (ROOT / "README.md").read_text()
    block = re.search(r"## Quick start.*?```bash\n(.*?)```", text, re.S).group(1)
    in_a_sample_folder(tmp_path, monkeypatch)
    assert block.startswith("python train.py") and run_block(block, tmp_path) >= 5
    assert (tmp_path / "model" / "exp" / "best.pth").is_file() and (tmp_path / "output" / "submission.csv").is_file()


def test_the_tools_doc_runs_as_written_after_the_quick_start(tmp_path, monkeypatch):
    """docs/tools.md's blocks (report, k-fold + audit + relabel, search, faces), in order, after the
    quick start's two training runs; every run without the automatic precision, report and loader
    workers (the quick start test runs those)."""
    in_a_sample_folder(tmp_path, monkeypatch)
    quick_start = re.search(r"## Quick start.*?```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S).group(1)
    run_block("\n".join(line for line in quick_start.splitlines() if "train.py" in line), tmp_path, FAST_TRAINING)
    blocks = bash_blocks((ROOT / "docs" / "tools.md").read_text())
    assert len(blocks) == 4 and sum(run_block(block, tmp_path, FAST_TRAINING) for block in blocks) >= 7
    assert (tmp_path / "model" / "relabeled" / "best.pth").is_file()


def train_flags(text) -> dict:
    """--flag -> its values (a tuple) of the first train.py command of a shell text (lines continued with \\)."""
    command = re.search(r"python train\.py(?:\\\n|[^\n])*", text).group(0)
    words = shlex.split(re.sub(r"\\\n\s*", " ", command))
    flags, current = {}, None
    for word in words[words.index("train.py") + 1:]:
        if word.startswith("--"):
            current = word
            flags[current] = ()
        elif current:
            flags[current] += (word,)
    return flags


SHARED_PATHS = {"$FACE": "../shared/weights/faceres_vggface2_mobilenetv1",
                "$WEIGHTS": "../shared/weights/efficientnet_lite0.safetensors", "$TRAIN_FLAGS": ""}
WHERE = {"--data_dir", "--model_dir", "--name", "--seed", "--cache_dir", "--report"}


def recipe_flags(text) -> dict:
    """The first train.py command's flags of a block or recipe script, the scripts' variables read as their
    defaults and the flags that only say where and under what name left out."""
    for variable, value in SHARED_PATHS.items():
        text = text.replace(variable, value)
    return {flag: values for flag, values in train_flags(text).items() if flag not in WHERE}


def script_flags(path) -> dict:
    """recipe_flags of a recipe script; a candidate that wraps another (`TRAIN_FLAGS="..." exec bash OTHER`)
    gives the other's flags with its own winning, as the last of a repeated flag wins in train.py
    (`--layer_decay 1`, every group at the full lr, is no layer decay: bit-identical, and not shown)."""
    text = path.read_text()
    wrapped = re.search(r'TRAIN_FLAGS="(.*?)\$\{TRAIN_FLAGS:-\}".*?exec bash "\$\(dirname "\$0"\)/(.*?)"', text, re.S)
    if not wrapped:
        return recipe_flags(text)
    flags = {**script_flags(path.parent / wrapped.group(2)), **recipe_flags("python train.py " + wrapped.group(1))}
    return {flag: values for flag, values in flags.items() if (flag, values) != ("--layer_decay", ("1",))}


def doc_block(doc, title) -> str:
    return re.search(re.escape(title) + r".*?```bash\n(.*?)```", (ROOT / doc).read_text(), re.S).group(1)


def test_the_readme_cpu_recipe_is_the_same_budget_script_that_the_recipe_test_runs():
    """The README's CPU block trains what benchmarks/recipes/same_budget.sh trains (the script the recipe
    test runs and bench_recipes.py measures): the same flags and values but where and under what name."""
    shown = recipe_flags(doc_block("README.md", "On a CPU, the measured recipe"))
    assert shown["--model"] == ("local-dir:../shared/weights/faceres_vggface2_mobilenetv1",)
    assert shown == recipe_flags((ROOT / "benchmarks" / "recipes" / "same_budget.sh").read_text())


@pytest.mark.parametrize("title, script", [("**One hour**", "one_hour.sh"),
                                           ("**Same budget on lite0**", "candidates/same_budget_lite0.sh"),
                                           ("**One hour on lite0**", "candidates/one_hour_lite0.sh")])
def test_the_quality_doc_blocks_are_the_recipe_scripts(title, script):
    """docs/quality.md's blocks train what the scripts bench_recipes.py measures train (the one-hour
    script is also run by the recipe test)."""
    shown = recipe_flags(doc_block("docs/quality.md", title))
    assert shown == script_flags(ROOT / "benchmarks" / "recipes" / script)


def test_the_one_hour_members_are_the_same_budget_recipe():
    recipes = ROOT / "benchmarks" / "recipes"
    assert recipe_flags((recipes / "one_hour.sh").read_text()) == recipe_flags((recipes / "same_budget.sh").read_text())


def test_the_readme_gpu_block_passes_every_check_short_of_downloading(tmp_path, monkeypatch):
    """The README's GPU commands (a convnext from timm's hub, which cannot download here): train.py's
    flags parse and pass all of its checks (/data/ read as the bundled sample, the detector file in
    weights/), and inference.py's parse."""
    import flags
    import inference
    block = re.search(r"On a GPU server.*?```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S).group(1)
    train_line, infer_line = re.sub(r"\\\n\s*", " ", block.replace("/data/", "sample_data/")).strip().splitlines()
    in_a_sample_folder(tmp_path, monkeypatch)
    args = flags.parse_args(shlex.split(train_line)[2:])
    flags.validate(args)
    assert (args.model, args.pretrained, args.amp, args.face_crop) == ("convnext_tiny", "auto", "auto", True)
    assert inference.build_parser().parse_args(shlex.split(infer_line)[2:]).tta == "hflip"

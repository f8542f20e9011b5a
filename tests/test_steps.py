"""steps/: the patch series that `git am` turns into the lecture's commit history. It
applies to an empty repository; every step is small (one idea: at most MAX_STEP_LINES
changed lines of code, the last one at most MAX_LAST_STEP_LINES, so that no catch-all step
grows at the end) and ends with a `Run:` line; every step's Python compiles; every step's
commands (the `Run:` lines of its message) run on a CPU; and the last step's files are the
repository's.

The commands run as written, offline (tests/steps_runner.py stands in for the downloads),
except that the repository's own steps train at a smaller size: the same code, with
SMALLER appended to their training commands, and no new run past MAX_STEPS steps."""
import json
import os
import pathlib
import re
import shlex
import subprocess
import sys

import pytest

from conftest import EXAMPLES, GIT_ENV, ROOT, SMALLER, XDIST, git

STEPS = os.path.join(ROOT, "steps")
REFRESH = "steps/refresh"
# a new run trains at most this many steps here (a --resume goes on to the step it names)
MAX_STEPS = 10
# the limits of steps/refresh and the README: lines changed in code files, per step
MAX_STEP_LINES = 400
MAX_LAST_STEP_LINES = 200

@pytest.fixture(scope="module")
def series(tmp_path_factory):
    """The series applied with `git am` to a new repository -> (its path, [(commit,
    message)] oldest first)."""
    repo = str(tmp_path_factory.mktemp("lecture"))
    git(repo, "init", "-q")
    patches = sorted(name for name in os.listdir(STEPS) if name.endswith(".patch"))
    git(repo, "am", "-q", *[os.path.join(STEPS, name) for name in patches])
    commits = git(repo, "rev-list", "--reverse", "HEAD", text=True).split()
    assert len(commits) == len(patches)
    return repo, [(c, git(repo, "log", "-1", "--format=%B", c, text=True)) for c in commits]


def code_lines(patch_text):
    """Lines a patch adds or removes in code files: input.txt, bench.py, tests/, docs/,
    Markdown, notebooks and *.txt aside (steps/refresh counts the same way)."""
    count = 0
    for block in patch_text.split("\ndiff --git ")[1:]:
        name = re.match(r"a/(\S+) b/", block).group(1)
        if (name in ("input.txt", "bench.py") or name.startswith(("tests/", "docs/"))
                or name.endswith((".md", ".ipynb", ".txt"))):
            continue
        count += sum(1 for line in block.splitlines()
                     if line[:1] in "+-" and not line.startswith(("+++", "---")))
    return count


def test_code_lines_counts_code_files_only():
    patch = ("Subject: x\n\n+not a change: the message\n---\n"
             "diff --git a/train_gpt2.py b/train_gpt2.py\n--- a/train_gpt2.py\n"
             "+++ b/train_gpt2.py\n@@ -1,2 +1,2 @@\n-old\n+new\n+more\n context\n"
             "diff --git a/README.md b/README.md\n--- a/README.md\n+++ b/README.md\n"
             "@@ -1 +1 @@\n-a\n+b\n"
             "diff --git a/tests/test_x.py b/tests/test_x.py\n+x\n")
    assert code_lines(patch) == 3


def test_every_step_is_small_and_says_how_to_run_it():
    patches = sorted(name for name in os.listdir(STEPS) if name.endswith(".patch"))
    problems = []
    for n, name in enumerate(patches, start=1):
        text = pathlib.Path(STEPS, name).read_text(encoding="utf-8", errors="replace")
        lines = code_lines(text)
        limit = MAX_LAST_STEP_LINES if n == len(patches) else MAX_STEP_LINES
        if lines > limit:
            problems.append(f"{name} changes {lines} lines of code, more than {limit}"
                            + (" for the last step: put each change in the step of its idea"
                               if n == len(patches) else ": split it into steps of one idea"))
        message = text.partition("\ndiff --git ")[0]
        if not re.search(r"^Run: \S", message, re.M):
            problems.append(f"{name} has no `Run:` line: end its message with the command "
                            "that shows it")
    assert not problems, "\n".join(problems)


def test_refresh_counts_as_this_test_does():
    """steps/refresh refuses what this test fails: both must count the same lines."""
    listed = subprocess.run([os.path.join(ROOT, REFRESH), "--sizes"], check=True,
                            capture_output=True, text=True).stdout.split("\n")
    sizes = dict(reversed(line.split()) for line in listed if line.strip())
    patches = sorted(name for name in os.listdir(STEPS) if name.endswith(".patch"))
    assert sorted(sizes) == patches
    for name in patches:
        text = pathlib.Path(STEPS, name).read_text(encoding="utf-8", errors="replace")
        assert int(sizes[name]) == code_lines(text), name


def test_last_step_is_the_repository(series):
    repo, commits = series
    wanted = subprocess.run([os.path.join(ROOT, REFRESH), "--files"], check=True,
                            capture_output=True, text=True).stdout.split()
    tracked = git(repo, "ls-tree", "--name-only", "HEAD", text=True).split()
    differ = sorted(set(wanted) ^ set(tracked))
    differ += [name for name in wanted if name in tracked
               and git(repo, "show", f"HEAD:{name}") != pathlib.Path(ROOT, name).read_bytes()]
    if differ:
        pytest.fail(f"steps/ is out of date: its last step is not the repository's code "
                    f"({', '.join(differ)}); run {REFRESH}", pytrace=False)


def test_every_step_compiles(series):
    repo, commits = series
    seen = set()
    for n, (commit, message) in enumerate(commits, start=1):
        listing = git(repo, "ls-tree", "-r", commit, text=True).splitlines()
        for line in listing:
            meta, name = line.split("\t")
            blob = meta.split()[2]
            if blob in seen or not name.endswith((".py", ".ipynb")):
                continue
            seen.add(blob)
            source = git(repo, "cat-file", "blob", blob, text=True)
            where = f"step {n} ({message.splitlines()[0]}): {name}"
            if name.endswith(".ipynb"):
                cells = [c for c in json.loads(source)["cells"] if c["cell_type"] == "code"]
                # IPython's magics (%matplotlib) are not Python
                source = "\n".join(line for c in cells for line in "".join(c["source"]).split("\n")
                                   if not line.startswith("%"))
            compile(source, where, "exec")


def commands(message):
    """The `Run:` lines of a step's message, as argv lists."""
    return [shlex.split(line[len("Run:"):]) for line in message.splitlines()
            if line.startswith("Run:")]


def test_every_step_runs(series, tmp_path):
    repo, commits = series
    steps = []  # (commit, [(name, argv)]) of the steps that have commands
    for n, (commit, message) in enumerate(commits, start=1):
        runs = []
        for argv in commands(message):
            if "--preset" in argv and "--resume" not in argv:
                argv += SMALLER
            if "--max-steps" in argv and "--resume" not in argv:
                at = argv.index("--max-steps") + 1
                argv[at] = str(min(int(argv[at]), MAX_STEPS))
            runs.append((f"step {n} ({message.splitlines()[0]}): {shlex.join(argv)}", argv))
        if runs:
            steps.append((commit, runs))
    assert sum(len(runs) for _, runs in steps) >= 40, "the steps' messages lost their Run: lines"
    # two runners, one thread each, on every other step: the machine's two cores busy
    # (under pytest-xdist the other core runs the other worker's tests: one runner)
    n_runners = 1 if XDIST else 2
    hellaswag = "".join(json.dumps(example) + "\n" for example in EXAMPLES)
    runners, names = [], []
    for i in range(n_runners):
        work = tmp_path / f"runner{i}"
        work.mkdir()
        git(str(work), "clone", "-q", "--shared", repo, "lecture")
        mine = steps[i::n_runners]
        names.append([name for _, runs in mine for name, _ in runs])
        spec = {"repo": str(work / "lecture"), "work": str(work),
                "files": {"hellaswag/hellaswag_val.jsonl": hellaswag},
                "jobs": [{"commit": commit, "argv": argv, "timeout": 120}
                         for commit, runs in mine for _, argv in runs]}
        with open(work / "jobs.json", "w") as f:
            json.dump(spec, f)
        runners.append(subprocess.Popen(
            [sys.executable, os.path.join(ROOT, "tests", "steps_runner.py"),
             str(work / "jobs.json")], env=dict(GIT_ENV, OMP_NUM_THREADS="1")))
    for runner in runners:
        assert runner.wait(timeout=600) == 0, "tests/steps_runner.py failed"
    failed = []
    for i in range(n_runners):
        with open(tmp_path / f"runner{i}" / "results.json") as f:
            results = json.load(f)
        for name, result in zip(names[i], results):
            with open(result["log"], errors="replace") as f:
                output = f.read()
            losses = [float(line.split("| loss ")[1].split()[0])
                      for line in output.splitlines() if "| loss " in line]
            if result["status"] != 0:
                failed.append(f"{name}: exit status {result['status']}\n{output[-3000:]}")
            elif len(losses) >= 2 and not losses[-1] < losses[0]:
                failed.append(f"{name}: the training loss did not fall: {losses}")
    assert not failed, "\n\n".join(failed)

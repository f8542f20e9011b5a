"""Shared pieces of the tests: the repository root on sys.path, the small models and
argument lists they train, token shards and jsonl files, a network that refuses, and
running the real scripts in a subprocess. Each helper is here once."""
import functools
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import zipfile

import numpy as np
import pytest

# Under pytest-xdist (`-n 2`, as the README runs the suite) each worker has a core of its
# own: one thread per process, the scripts the tests start included, or two workers'
# threads would wait for each other at every op. Set before torch is imported.
XDIST = "PYTEST_XDIST_WORKER" in os.environ
if XDIST:
    os.environ["OMP_NUM_THREADS"] = "1"

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import warm_python  # noqa: E402  (imports nothing heavy)

# The tests that take longest, started first: with --dist worksteal, the other worker
# takes the short ones meanwhile, and no long test is left to run alone at the end.
LONGEST_FIRST = ["test_steps.py::test_every_step_runs",
                 "test_readme.py::test_readme_commands_run_in_order",
                 "test_distributed.py::test_interrupts_under_torchrun_then_resume_is_bitwise_identical",
                 "test_lm_eval.py::test_lm_eval_scores_the_export_as_we_do",
                 "test_train.py::test_shakespeare_preset_end_to_end",
                 "test_precision.py::test_fp16_sigkill_then_resume_is_bitwise_identical",
                 "test_tracking.py::test_tensorboard_and_wandb_hold_log_txt_across_a_rewind",
                 "test_distributed.py::test_hellaswag_is_split_across_ranks"]


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("/")[-1], len(rank)))


def pytest_collection(session):
    # Without a GPU, fused_ce.py's Triton kernels run in Triton's interpreter
    # (test_fused_ce.py). Triton reads the switch once, when it is first imported, and
    # transformers' models and torch.compile import it early: so it is set here, before
    # any test module is imported. (Not when this module is imported: pytest-xdist's
    # controller, which collects and runs no test, then starts its workers without
    # waiting a second and a half for torch.)
    import torch
    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"


# A GPT small enough that a training step takes milliseconds on a CPU; the flags go on
# top of the gpt2 preset, so the code path is the real one.
TINY = ["--n-layer", "2", "--n-head", "2", "--n-embd", "32", "--block-size", "32",
        "--vocab-size", "512", "--batch-size", "4", "--seq-len", "32",
        "--total-batch-size", "256", "--warmup-steps", "2", "--max-lr", "3e-3",
        "--eval-every", "4", "--val-tokens", "1024", "--sample-every", "0",
        "--hellaswag-every", "0", "--device", "cpu", "--no-compile"]

# The shakespeare preset, so the checkpoint holds real GPT-2 token ids of input.txt and
# its samples decode to text, shrunk to a model that trains a step in a blink.
SHAKESPEARE_TINY = ["--preset", "shakespeare", "--n-layer", "2", "--n-head", "2",
                    "--n-embd", "32", "--block-size", "64", "--seq-len", "32",
                    "--batch-size", "4", "--total-batch-size", "128", "--val-tokens", "256",
                    "--sample-every", "0", "--device", "cpu"]

# For `--preset shakespeare` in the steps of steps/ (test_steps.py): a GPT of 2 layers, 32
# wide, on batches of 2 x 32 tokens and a val loss over 256, in place of 4 layers, 128
# wide, 4 x 128 and 8192. Only flags that every step's train_gpt2.py has.
SMALLER = ["--n-layer", "2", "--n-embd", "32", "--batch-size", "2", "--seq-len", "32",
           "--total-batch-size", "64", "--val-tokens", "256"]

# The run that wrote tests/data/checkpoint_1b9a2e4.pt with the code of commit 1b9a2e4
# (before the one-script restructure), step 2 of 4, on write_token_shards' default data
OLD_RUN = ["--n-layer", "1", "--n-head", "2", "--n-embd", "16", "--block-size", "32",
           "--vocab-size", "512", "--batch-size", "4", "--seq-len", "32",
           "--total-batch-size", "256", "--warmup-steps", "2", "--max-lr", "3e-3",
           "--eval-every", "2", "--val-tokens", "512", "--sample-every", "0",
           "--hellaswag-every", "0", "--device", "cpu", "--no-compile", "--no-bf16",
           "--max-steps", "4", "--checkpoint-every", "2", "--keep-checkpoints", "0"]


def tiny_hf_gpt2(seed=0, **shape):
    """A randomly initialised transformers GPT2LMHeadModel with GPT-2's vocabulary, 2
    layers of 64 unless shape says otherwise: what the tests load where a user loads
    OpenAI's weights, which are out of reach here."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(seed)
    config = dict(n_layer=2, n_head=4, n_embd=64, n_positions=64, vocab_size=50257)
    return GPT2LMHeadModel(GPT2Config(**dict(config, **shape))).eval()


def write_shards(data_dir, streams, prefix="test"):
    """Token arrays as shards through fineweb.write_shard (the real format): the first is
    the val split's shard 0, the rest train shards."""
    import fineweb
    os.makedirs(data_dir, exist_ok=True)
    for i, tokens in enumerate(streams):
        split = "val" if i == 0 else "train"
        fineweb.write_shard(os.path.join(data_dir, f"{prefix}_{split}_{i:06d}.bin"),
                            np.asarray(tokens, dtype=np.uint16))
    return str(data_dir)


def write_token_shards(data_dir, n_train=3, tokens_per_shard=4096, vocab=512, seed=0):
    """val shard 0 and n_train train shards of a repetitive token stream (so a model can
    learn it)."""
    rng = np.random.default_rng(seed)
    phrase = rng.integers(0, vocab, size=97)
    streams = []
    for _ in range(n_train + 1):
        noise = rng.integers(0, vocab, size=tokens_per_shard)
        streams.append(np.where(rng.random(tokens_per_shard) < 0.2, noise,
                                np.resize(phrase, tokens_per_shard)))
    return write_shards(data_dir, streams)


def llmc_write(path, tokens):
    """A shard in llm.c's layout, written the way its dev/data/data_common.py does it, with
    plain numpy and none of our code: a 256-int32 header (magic, version, count), then the
    uint16 tokens."""
    header = np.zeros(256, dtype=np.int32)
    header[0], header[1], header[2] = 20240520, 1, len(tokens)
    with open(path, "wb") as f:
        header.tofile(f)
        np.asarray(tokens, dtype=np.uint16).tofile(f)


def llmc_read(path):
    header = np.fromfile(path, dtype=np.int32, count=256)
    assert header[0] == 20240520 and header[1] == 1
    tokens = np.fromfile(path, dtype=np.uint16, offset=256 * 4)
    assert len(tokens) == header[2]
    return tokens


@pytest.fixture
def shards(tmp_path):
    return write_token_shards(str(tmp_path / "shards"))


def start(args, **popen_kwargs):
    """python ARGS... in the repository root, running: a Popen with text pipes."""
    return subprocess.Popen([sys.executable, *map(str, args)], cwd=ROOT, text=True,
                            **dict(dict(stdout=subprocess.PIPE, stderr=subprocess.PIPE),
                                   **popen_kwargs))


def run(args, timeout=300, cwd=None, env=None, check=True):
    """python ARGS... in the repository root (or cwd); returns the CompletedProcess.

    A script, -c code or -m module runs in a fork of tests/warm_python.py, which has
    imported torch already, when its environment agrees with that Python's in what torch
    and its libraries read at import; anything else starts a new Python."""
    args = [str(a) for a in args]
    env = dict(os.environ if env is None else env)
    if (args[0] in ("-c", "-m") or args[0].endswith(".py")) and reads_as_warm_python(env):
        proc = run_warm(args, cwd or ROOT, env, timeout)
    else:
        proc = subprocess.run([sys.executable] + args, cwd=cwd or ROOT, capture_output=True,
                              text=True, timeout=timeout, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


@functools.cache
def warm_server():
    """This pytest process's warm Python (tests/warm_python.py) and its environment: started
    on first use with the environment of that moment, it ends when its stdin closes, with
    pytest."""
    env = dict(os.environ)
    return subprocess.Popen([sys.executable, warm_python.__file__], env=env, text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE), env


def reads_as_warm_python(env):
    _, warm_env = warm_server()
    names = {k for k in set(env) | set(warm_env)
             if k.startswith(warm_python.READ_AT_IMPORT)}
    return all(env.get(k) == warm_env.get(k) for k in names)


def run_warm(args, cwd, env, timeout):
    server, _ = warm_server()
    with tempfile.TemporaryDirectory() as tmp:
        out, err = os.path.join(tmp, "stdout"), os.path.join(tmp, "stderr")
        server.stdin.write(json.dumps({"argv": args, "cwd": str(cwd), "env": env,
                                       "stdout": out, "stderr": err, "timeout": timeout}) + "\n")
        server.stdin.flush()
        status = json.loads(server.stdout.readline())["status"]
        with open(out) as f, open(err) as g:
            stdout, stderr = f.read(), g.read()
    if status == -signal.SIGALRM:
        raise subprocess.TimeoutExpired([sys.executable] + args, timeout, stdout, stderr)
    return subprocess.CompletedProcess([sys.executable] + args, status, stdout, stderr)


def torchrun(extra, args, new_session=False):
    """torchrun EXTRA train_gpt2.py ARGS, running, one thread per rank, its ranks' output
    together on stdout."""
    return start(["-m", "torch.distributed.run", *extra, "train_gpt2.py", *args],
                 env=dict(os.environ, OMP_NUM_THREADS="1"), stderr=subprocess.STDOUT,
                 start_new_session=new_session)


# a git that needs no identity of the machine's and reads no configuration of the user's
GIT_ENV = dict(os.environ, GIT_CONFIG_GLOBAL=os.devnull, GIT_CONFIG_NOSYSTEM="1",
               GIT_AUTHOR_NAME="test", GIT_AUTHOR_EMAIL="test@example.invalid",
               GIT_COMMITTER_NAME="test", GIT_COMMITTER_EMAIL="test@example.invalid")


def git(repo, *args, **kwargs):
    """git -C repo ARGS... -> its stdout; a failure raises."""
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True,
                          env=GIT_ENV, **kwargs).stdout


# The start of `python -c` code whose network must stay out of reach: every way to open
# a connection raises
NO_NETWORK = ("import socket\n"
              "def refuse(*a, **k): raise OSError('network blocked by the test')\n"
              "socket.socket.connect = refuse\n"
              "socket.create_connection = refuse\n"
              "socket.getaddrinfo = refuse\n")


def refuse_network(monkeypatch, error=OSError("network blocked by the test")):
    """The same in this process, for the rest of the test: a connection raises error."""
    def refuse(*args, **kwargs):
        raise error
    for owner, name in ((socket.socket, "connect"), (socket, "create_connection"),
                        (socket, "getaddrinfo")):
        monkeypatch.setattr(owner, name, refuse)


def wait_for_line(proc, log_path, line):
    """Waits until the running proc has written `line` as a line of log_path."""
    while proc.poll() is None:
        if os.path.exists(log_path) and f"\n{line}" in open(log_path).read():
            return
        time.sleep(0.002)
    raise AssertionError(f"the run ended before logging {line!r}:\n{proc.communicate()[0]}")


def read_log(log_dir):
    """log.txt as [(step, stream, value)]."""
    with open(os.path.join(log_dir, "log.txt")) as f:
        return [(int(a), b, float(c)) for a, b, c in (line.split() for line in f)]


# written for these tests, in the format of the real files (which also carry ctx_a,
# ctx_b, activity_label, ...: extra fields are ignored)
EXAMPLES = [
    {"ctx": "A woman pours flour into a bowl. She", "label": 1, "activity_label": "Baking",
     "endings": ["drives the bowl to the airport.", "cracks two eggs over it and stirs.",
                 "paints the ceiling blue.", "sings to the flour for an hour."]},
    {"ctx": "A boy kicks a ball across the field. His friend", "label": 0,
     "endings": ["stops it with his foot.", "eats the ball.",
                 "climbs into the goal and sleeps until the evening comes.", "is a ball."]},
    {"ctx": "The man ties his shoes.", "label": 2,
     "endings": ["The shoes fly away.", "He ties the shoes to the roof.",
                 "He stands up and starts jogging down the road.", "He."]},
    {"ctx": "A dog waits by the door. When its owner comes home, the dog", "label": 3,
     "endings": ["opens the fridge.", "writes a letter.", "plays the piano quietly.",
                 "jumps up and wags its tail."]},
    {"ctx": "Two people sit in a canoe on a calm lake. They", "label": 0,
     "endings": ["paddle slowly toward the shore.", "fly the canoe.",
                 "read the lake.", "turn the lake into a mountain of sand and stones."]},
    {"ctx": "A chef slices onions", "label": 2,
     "endings": ["into the sky.", "with a spoon of music.", "with a sharp knife.", "."]},
    {"ctx": "How to water a plant. Fill a watering can with water. Pour", "label": 1,
     "endings": ["the can into the oven.", "the water slowly around the base of the plant.",
                 "it on your head.", "sand instead of water until the can is empty."]},
    {"ctx": "A girl holds a kite on a windy hill. She", "label": 3,
     "endings": ["eats the kite.", "buries the kite.", "folds the hill.",
                 "runs and lets the wind lift the kite into the air."]},
    {"ctx": "The teacher writes a sum on the board. The students", "label": 0,
     "endings": ["copy it into their notebooks.", "erase the school.",
                 "throw the board out of the window and leave for the beach at once.", "!"]},
    {"ctx": "A cyclist reaches the top of a steep hill and", "label": 1,
     "endings": ["swims.", "rolls down the other side with a smile.", "melts.",
                 "becomes a hill."]},
]


def write_jsonl(path, records):
    """One JSON object a line: each record a dict, or a text that becomes a corpus line
    {"id": i, "text": text}."""
    with open(path, "w", encoding="utf-8") as f:
        for i, record in enumerate(records):
            record = {"id": i, "text": record} if isinstance(record, str) else record
            f.write(json.dumps(record) + "\n")
    return str(path)


def flip_a_bit(path):
    """Flips one bit in the middle of the largest tensor's bytes in a torch.save file, as
    a failing disk or a bad copy would."""
    with zipfile.ZipFile(path) as archive:
        record = max(archive.infolist(), key=lambda r: r.file_size)
    with open(path, "r+b") as f:
        f.seek(record.header_offset + 26)  # a zip local header: 30 bytes, then name, extra
        name_len, extra_len = (int.from_bytes(f.read(2), "little") for _ in range(2))
        f.seek(record.header_offset + 30 + name_len + extra_len + record.file_size // 2)
        byte = f.read(1)[0]
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte ^ 0x10]))


@pytest.fixture
def small_fs(tmp_path):
    """mount(size, options="") -> the path of a new tmpfs of that size ("700k"): a real
    filesystem that fills up or is read-only, as a user's disk does. Needs root, as the
    tests have here and in CI; skipped with the reason elsewhere. Unmounted afterwards."""
    mounted = []

    def mount(size, options=""):
        path = tmp_path / f"fs{len(mounted)}"
        path.mkdir()
        try:
            proc = subprocess.run(["mount", "-t", "tmpfs", "-o", ",".join(
                [f"size={size}"] + ([options] if options else [])), "tmpfs", str(path)],
                capture_output=True, text=True)
            why = proc.stderr.strip() if proc.returncode else None
        except OSError as e:
            why = str(e)
        if why:
            pytest.skip(f"cannot mount a tmpfs here ({why})")
        mounted.append(path)
        return str(path)
    yield mount
    for path in mounted:
        subprocess.run(["umount", str(path)], check=True)


def fill(directory):
    """Writes into directory until its filesystem is full."""
    with open(os.path.join(directory, "filler"), "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError as e:
            assert e.errno == 28, e  # ENOSPC

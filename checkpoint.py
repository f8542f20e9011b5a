"""
The files a training run leaves in its --log-dir, and how to read them back:

- model_XXXXX.pt: a checkpoint. One dict of tensors and plain data (torch.save), read with
  weights_only=True, so opening a file never runs code. It holds the weights, the model
  shape, the run's whole configuration, the optimizer state, the step, the data loader's
  position and every random generator: enough to resume bit for bit.
- log.txt: one line per measurement, `STEP train|val|hella VALUE`, build-nanogpt's format.

And GPT-2's weight layout as Hugging Face's transformers keeps it, both ways: our
checkpoints become a GPT2LMHeadModel (hellaswag.py, --export-hf), and OpenAI's weights
become our GPT (train_gpt2.GPT.from_pretrained).

This module never imports train_gpt2: a model comes in as an argument.
"""

import hashlib
import os
import pickle
import random
import re
import secrets
import shlex
import signal
import sys
import tempfile
import zipfile

import numpy as np
import torch
import torch.distributed as dist

from common import (DirLock, UserError, atomic_write, os_error_in, os_error_message,
                    why_hub_unreachable)
from device import is_out_of_memory, out_of_memory_error
from gguf_export import export_gguf
from tokenizer import GPT2_VOCAB, save_hf_tokenizer

CHECKPOINT_KIND = "train_gpt2 checkpoint"
CHECKPOINT_NAME = re.compile(r"model_(\d+)\.pt")


class CheckpointError(UserError):
    pass

# -----------------------------------------------------------------------------
# Checkpoints


def checkpoint_path(log_dir, step):
    return os.path.join(log_dir, f"model_{step:05d}.pt")  # 5 digits, more past 99,999


def checkpoint_step(path):
    return int(CHECKPOINT_NAME.fullmatch(os.path.basename(path)).group(1))


def list_checkpoints(log_dir):
    """The complete checkpoints in log_dir, oldest step first. Sorted by the step number,
    not the name: model_100000.pt comes after model_99999.pt. A save in progress is a
    hidden temp file, never listed."""
    if not os.path.isdir(log_dir):
        return []
    found = [(int(m.group(1)), name) for name in os.listdir(log_dir)
             if (m := CHECKPOINT_NAME.fullmatch(name))]
    return [os.path.join(log_dir, name) for _, name in sorted(found)]


def read_run_checkpoint(path, device="cpu"):
    """read_checkpoint(path), or for a log dir its newest intact checkpoint: so a command can
    name a run (`--checkpoint log_shakespeare`) without knowing at which step it stopped."""
    if not os.path.isdir(path):
        return read_checkpoint(path, device)
    newest = read_newest_checkpoint(path, device)
    if newest is None:
        raise CheckpointError(f"no checkpoint in {path}/: train first, or give a "
                              "model_XXXXX.pt")
    return newest[1]


def check_crc(path, suffix=""):
    """Reads the records of the zip archive torch.save wrote (those whose name ends with
    suffix) and checks each against the CRC-32 torch.save stored for it. torch.load does
    not: a bit flipped on disk or in a copy would load as a silently wrong weight."""
    with zipfile.ZipFile(path) as archive:
        for record in archive.infolist():
            if record.filename.endswith(suffix):
                with archive.open(record) as f:
                    while f.read(1 << 24):  # raises BadZipFile at the end of a bad record
                        pass


def read_checkpoint(path, device="cpu", mmap=False):
    """torch.load with weights_only=True: tensors and plain data only, so a file cannot
    run code when it is opened. Every byte is checked against the file's CRC-32s first.
    mmap=True maps the tensors instead of reading them, for a look at the plain data (whose
    bytes alone are checked). Raises CheckpointError with a one-line reason."""
    if not os.path.isfile(path):
        raise CheckpointError(f"no checkpoint at {path}")
    if not zipfile.is_zipfile(path):  # torch.save writes a zip archive, its index at the end
        raise CheckpointError(f"{path} is truncated or not a torch checkpoint at all")
    try:
        check_crc(path, "/data.pkl" if mmap else "")
    except (zipfile.BadZipFile, EOFError, OSError) as e:
        raise CheckpointError(f"{path} is corrupt, damaged on disk or in a copy "
                              f"({str(e).splitlines()[0][:120]})") from None
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{path} holds objects other than tensors and plain data, "
                              f"refused by weights_only=True ({str(e).splitlines()[0][:120]})")
    except (RuntimeError, EOFError, OSError) as e:
        raise CheckpointError(f"{path} is truncated or not a torch file "
                              f"({str(e).splitlines()[0][:120]})")
    if not isinstance(ckpt, dict) or ckpt.get("kind") != CHECKPOINT_KIND:
        raise CheckpointError(f"{path} is not a checkpoint of train_gpt2.py "
                              "(for GPT-2 weights from Hugging Face use GPT.from_pretrained)")
    ckpt.setdefault("run_id", directory_run_id(path))
    return ckpt


def new_run_id():
    """A fresh run's id. Its checkpoints carry it, and so do those of every resume of it:
    a run deletes and trims only what carries its own id."""
    return secrets.token_hex(8)


def directory_run_id(path):
    # a checkpoint saved before run ids belongs to the run of the directory it lies in
    return hashlib.sha256(os.path.realpath(os.path.dirname(path) or ".").encode()).hexdigest()[:16]


def checkpoint_run_id(path):
    """The run id of the checkpoint at path, None if it cannot be read (such a file is no
    run's: never deleted, never counted)."""
    try:
        return read_checkpoint(path, mmap=True)["run_id"]
    except CheckpointError:
        return None


def read_newest_checkpoint(log_dir, device="cpu"):
    """-> (path, checkpoint) of the newest checkpoint in log_dir that reads back intact,
    saying in one line why each newer one is passed over; None if log_dir holds none."""
    found = list_checkpoints(log_dir)
    newest_error = None
    for path in reversed(found):
        try:
            ckpt = read_checkpoint(path, device)
        except CheckpointError as e:
            print(f"warning: {e}; trying the checkpoint before it")
            newest_error = newest_error or e
            continue
        return path, ckpt
    if newest_error:
        raise CheckpointError(f"no intact checkpoint in {log_dir}/; the newest: {newest_error}")
    return None


def newer_checkpoints(log_dir, run_id, step):
    """The checkpoints of run `run_id` in log_dir past `step`, oldest first: those that a
    run resumed from `step` would replace as it reaches their steps."""
    return [p for p in list_checkpoints(log_dir)
            if checkpoint_step(p) > step and checkpoint_run_id(p) == run_id]


def spare_log_path(log_dir):
    """log_dir/log.N.txt for the first N not taken: where a log.txt is kept aside."""
    n = 1
    while os.path.exists(path := os.path.join(log_dir, f"log.{n}.txt")):
        n += 1
    return path


def save_checkpoint(ckpt, log_dir, step, keep=0):
    """Writes ckpt as log_dir/model_{step}.pt; with keep > 0, then removes all but the
    newest `keep` checkpoints of this run (ckpt["run_id"]) up to this one: another run's
    checkpoints in log_dir, and this run's at later steps, stay. -> the path."""
    path = checkpoint_path(log_dir, step)
    # a kill at any moment leaves the previous checkpoints whole and no half-written file
    # under a checkpoint name; so does a full disk, whose half-written temp file is removed
    try:
        with atomic_write(path) as f:
            torch.save(dict(ckpt, kind=CHECKPOINT_KIND, step=step), f)
    except (OSError, RuntimeError) as e:  # torch.save hides a full disk in a RuntimeError
        if os_error_in(e) is None:
            raise
        raise CheckpointError(os_error_message(os_error_in(e), path, *what_was_kept(log_dir))) \
            from None
    if keep > 0:
        older = [p for p in list_checkpoints(log_dir)
                 if checkpoint_step(p) < step and checkpoint_run_id(p) == ckpt["run_id"]]
        for old in older[:max(0, len(older) - (keep - 1))]:
            os.remove(old)
    return path


def what_was_kept(log_dir):
    """-> (what a failed write in log_dir left intact, what to run then), for
    os_error_message."""
    newest = newest_intact(log_dir)
    if newest:
        return f"the checkpoint {newest} is intact", "--resume"
    return "no checkpoint was saved yet", "run again"


def log_write_error(e, log_path):
    """The UserError for an OSError while writing log.txt: what it was, what is kept."""
    return UserError(os_error_message(e, log_path, *what_was_kept(os.path.dirname(log_path))))


def run_failure(e, log_dir, ddp, B, T):
    """The UserError for a RuntimeError of a training run at micro-batch B x T that the
    user can act on: memory ran out (building the model or in a step), or, under torchrun,
    another rank died. None for anything else: a bug keeps its traceback."""
    if is_out_of_memory(e):
        return out_of_memory_error(e, B, T, newest_intact(log_dir))
    return lost_rank_error(e, log_dir) if ddp else None


# How a collective fails when another rank has died: gloo loses its TCP connection, NCCL
# reports an error or its watchdog a timeout (--dist-timeout)
PEER_LOST = ("Connection reset by peer", "Connection closed by peer", "Broken pipe", "NCCL",
             "timed out", "Timeout")


def lost_rank_error(e, log_dir):
    """The UserError for an exception `e` of a distributed run that says another rank died:
    the step it happened at, the newest intact checkpoint and the command that continues.
    None when e is something else (a bug keeps its traceback)."""
    cause = next((s for s in PEER_LOST if s in str(e)), None)
    if cause is None and not isinstance(e, dist.DistError):
        return None
    # torchrun stops the surviving ranks with SIGTERM as soon as it sees one die: this
    # rank is ending anyway, and first says what was kept
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    steps = [entry[0] for line in open_or_empty(os.path.join(log_dir, "log.txt"))
             if (entry := parse_log_line(line)) and entry[1] == "train"]
    newest = newest_intact(log_dir)
    command = resume_command(sys.argv, int(os.environ.get("LOCAL_WORLD_SIZE", 1)),
                             int(os.environ.get("WORLD_SIZE", 1)))
    return UserError(f"a rank was lost at step {steps[-1] + 1 if steps else 0} "
                     f"({cause or type(e).__name__}); " +
                     (f"the newest intact checkpoint is {newest}: continue with `{command}`"
                      if newest else "no checkpoint was saved: start the run again"))


def resume_command(argv, local_world_size, world_size):
    """The torchrun command that continues a run launched with train_gpt2.py's argv: the
    same flags, --resume (without a PATH: the newest intact checkpoint) at the end."""
    same, i = [], 0
    while i < len(argv):
        same += [] if argv[i] in ("--resume", "--rewind") else [argv[i]]
        path_follows = argv[i] == "--resume" and i + 1 < len(argv) \
            and not argv[i + 1].startswith("-")
        i += 2 if path_follows else 1
    args = shlex.join(same + ["--resume"])
    if local_world_size == world_size:  # one node
        return f"torchrun --standalone --nproc_per_node={local_world_size} {args}"
    return f"torchrun ... {args} on every node"


def open_or_empty(path):
    try:
        with open(path) as f:
            return f.readlines()
    except OSError:
        return []


def newest_intact(log_dir):
    """The newest checkpoint in log_dir whose bytes all match their CRC-32s, or None."""
    for path in reversed(list_checkpoints(log_dir)):
        try:
            check_crc(path)
            return path
        except (zipfile.BadZipFile, EOFError, OSError):
            continue
    return None


def open_log_dir(log_dir, run_id=None):
    """Makes log_dir and locks it against a second live run (-> the lock), and removes the
    temp files of a save that a kill cut short. run_id: the run a resume continues, None
    for a fresh run. A run never mixes its checkpoints with another run's, so that --resume
    always finds its own, and never writes into another run's log.txt: that one is renamed,
    not deleted. A log.txt is this run's when a checkpoint of this run lies beside it."""
    if os.path.exists(log_dir) and not os.path.isdir(log_dir):
        raise UserError(f"--log-dir {log_dir} is a file, not a directory; choose another "
                        "--log-dir")
    try:
        os.makedirs(log_dir, exist_ok=True)
        tempfile.TemporaryFile(dir=log_dir).close()  # fail now, not at the first log line
        lock = DirLock(log_dir, "training run")
    except OSError as e:
        raise UserError(f"--log-dir {log_dir}: {os_error_message(e, log_dir)}") from None
    try:
        runs = [checkpoint_run_id(path) for path in list_checkpoints(log_dir)]
        if run_id is None and runs:
            raise UserError(f"{log_dir}/ already holds checkpoints of a run: continue it with "
                            "--resume, or choose another --log-dir")
        if any(run not in (None, run_id) for run in runs):
            raise UserError(f"{log_dir}/ holds the checkpoints of another run, which a resume "
                            "must not mix with its own: resume into another --log-dir")
    except UserError:
        lock.release()
        raise
    for name in os.listdir(log_dir):
        if re.fullmatch(r"\.model_\d+\.pt\.(\d+\.)?tmp", name):
            os.remove(os.path.join(log_dir, name))
    log_path = os.path.join(log_dir, "log.txt")
    if run_id not in runs and os.path.exists(log_path):
        os.replace(log_path, kept := spare_log_path(log_dir))
        print(f"kept the log.txt already in {log_dir}/ as {kept}"
              + (" (no checkpoint of this run lies beside it)" if run_id else ""))
    return lock

# -----------------------------------------------------------------------------
# Random state: every generator a training step could touch, as tensors and plain data


def rng_state(device_type, world_size=1):
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state["numpy"] = [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached]
    if device_type == "cuda":
        # each rank has its own CUDA generator: gather them all into rank 0's checkpoint
        # (a collective under DDP: every rank must call this)
        mine = torch.cuda.get_rng_state().cuda()
        states = [torch.empty_like(mine) for _ in range(world_size)]
        if world_size > 1:
            dist.all_gather(states, mine)
        else:
            states = [mine]
        state["cuda"] = [s.cpu() for s in states]
    return state


def set_rng_state(state, device_type, rank=0):
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if device_type == "cuda" and "cuda" in state and rank < len(state["cuda"]):
        torch.cuda.set_rng_state(state["cuda"][rank].cpu())

# -----------------------------------------------------------------------------
# log.txt


def log_line(log_path, step, stream, value):
    try:
        with open(log_path, "a") as f:
            f.write(f"{step} {stream} {value}\n")  # repr: the shortest text that reads back exactly
    except OSError as e:  # a full disk; a log dir made read-only under a running run
        raise log_write_error(e, log_path) from None


def parse_log_line(line):
    """'STEP STREAM VALUE' -> (step, stream, value), or None for a line of another shape."""
    parts = line.split()
    if len(parts) != 3:
        return None
    try:
        return int(parts[0]), parts[1], float(parts[2])
    except ValueError:
        return None


def read_log(path):
    """log.txt -> {stream: ([steps], [values])}, streams train, val and hella. Lines of
    another shape are skipped, with one warning that counts them."""
    streams, bad = {}, 0
    with open(path) as f:
        for line in f:
            entry = parse_log_line(line)
            if entry is None:
                bad += line.strip() != ""
                continue
            steps, values = streams.setdefault(entry[1], ([], []))
            steps.append(entry[0])
            values.append(entry[2])
    if bad:
        print(f"warning: {path}: skipped {bad} malformed line(s)")
    return streams


# what a training step logs (scale and skipped: fp16's GradScaler); the other streams are
# evaluations, which run before the step of the same number
TRAIN_STREAMS = ("train", "scale", "skipped")


def trim_log(log_path, step, keep_evaluations=True):
    """A resumed run repeats what came after its checkpoint: drop those lines, so the log
    reads as one run (evaluations at the checkpoint's step ran before it was saved, unless
    an interrupt saved it). A malformed line stays where it is among the lines kept; after
    them it goes with the rest, as does a last line cut short by a kill. One warning counts
    them."""
    if not os.path.exists(log_path):
        return
    with open(log_path) as f:
        lines = f.readlines()
    keep, past_checkpoint, kept_bad, dropped_bad = [], False, 0, 0
    for line in lines:
        entry = parse_log_line(line)
        if entry is None:
            if past_checkpoint or not line.endswith("\n"):
                dropped_bad += line.strip() != ""
            else:
                kept_bad += line.strip() != ""
                keep.append(line)
        elif entry[0] > step or (entry[0] == step and (entry[1] in TRAIN_STREAMS
                                                        or not keep_evaluations)):
            past_checkpoint = True
        else:
            keep.append(line if line.endswith("\n") else line + "\n")
    if kept_bad or dropped_bad:
        print(f"warning: {log_path}: {kept_bad + dropped_bad} malformed line(s): kept "
              f"{kept_bad} among the lines up to step {step}, dropped {dropped_bad} after them")
    try:
        with atomic_write(log_path, "w") as f:
            f.writelines(keep)
    except OSError as e:
        raise log_write_error(e, log_path) from None

# -----------------------------------------------------------------------------
# GPT-2 in Hugging Face's layout. OpenAI's checkpoint uses a "Conv1D" module for these: a
# Linear with its weight stored transposed.

CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight",
                  "mlp.c_proj.weight")


def hf_config(model_config, vocab_size):
    from transformers import GPT2Config
    c = model_config
    return GPT2Config(vocab_size=vocab_size, n_positions=c["block_size"], n_embd=c["n_embd"],
                      n_layer=c["n_layer"], n_head=c["n_head"], activation_function="gelu_new",
                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                      tie_word_embeddings=True, bos_token_id=50256, eos_token_id=50256)


def hf_state_dict(state_dict, vocab_size):
    """Our state dict -> transformers' GPT2LMHeadModel's, its embedding cut to vocab_size
    rows (the padded rows of a 50304 vocabulary are never real tokens)."""
    sd = {}
    for k, w in state_dict.items():
        if k == "lm_head.weight":
            continue  # tied to transformer.wte.weight, which transformers ties back
        w = w.detach().float().cpu()
        if k.endswith(CONV1D_WEIGHTS):
            w = w.t()
        if k == "transformer.wte.weight":
            w = w[:vocab_size]
        sd[k] = w.contiguous()
    return sd


def hf_model(ckpt):
    """A checkpoint dict -> transformers' GPT2LMHeadModel with its weights, the padded
    vocabulary kept, so its logits are the trained model's own."""
    from transformers import GPT2LMHeadModel
    vocab = ckpt["model_config"]["vocab_size"]
    model = GPT2LMHeadModel(hf_config(ckpt["model_config"], vocab))
    missing, unexpected = model.load_state_dict(hf_state_dict(ckpt["model"], vocab),
                                                strict=False)
    # transformers ties lm_head to wte itself, and may keep causal-mask buffers of its own
    missing = [k for k in missing if k != "lm_head.weight"
               and not k.endswith((".attn.bias", ".attn.masked_bias"))]
    if missing or unexpected:
        raise CheckpointError(f"the checkpoint's weights do not fit GPT-2: "
                              f"{(missing + unexpected)[:5]}")
    return model.eval()


class PretrainedError(UserError):
    """A transformers model that cannot be loaded; the message says what to do."""


def load_pretrained(hf_class, name_or_path, hint):
    """hf_class.from_pretrained(name_or_path): a directory, or a name on the Hugging Face
    hub ("gpt2", "org/name"). When the hub cannot be reached, only Hugging Face's cache is
    read, at once, and a model that is not there is one line ending in `hint`."""
    # anything but "name" or "org/name" is a path on this machine: no hub to ask
    local = (os.path.isdir(name_or_path) or os.path.isabs(name_or_path)
             or name_or_path.startswith((".", "~")) or name_or_path.count("/") > 1)
    offline = None if local else why_hub_unreachable()
    import huggingface_hub.constants as hub
    was_offline = hub.HF_HUB_OFFLINE
    try:
        # offline for every file transformers looks for, also those it asks the hub about
        # despite local_files_only (a PEFT adapter's config, where peft is installed)
        hub.HF_HUB_OFFLINE = was_offline or offline is not None
        return hf_class.from_pretrained(name_or_path, local_files_only=offline is not None)
    except (OSError, ValueError) as e:
        if offline:
            raise PretrainedError(f"could not load model {name_or_path!r}: it is not in the "
                                  f"Hugging Face cache and the hub is out of reach ({offline}); "
                                  f"{hint}") from None
        first = next((ln for ln in str(e).splitlines() if ln.strip()), type(e).__name__)
        raise PretrainedError(f"could not load model {name_or_path!r}: {first.strip()}") from None
    finally:
        hub.HF_HUB_OFFLINE = was_offline


def export_hf(model, out_dir):
    """Write config.json + model.safetensors that transformers' GPT2LMHeadModel loads, and
    GPT-2's tokenizer beside them, so pipeline("text-generation", model=out_dir),
    lm-evaluation-harness and every transformers tool can use a model trained here.
    -> the names of the files written."""
    import dataclasses
    from safetensors.torch import save
    vocab = min(model.config.vocab_size, GPT2_VOCAB)  # cut a padded vocabulary
    config = hf_config(dataclasses.asdict(model.config), vocab)
    sd = hf_state_dict(model.state_dict(), vocab)
    try:
        os.makedirs(out_dir, exist_ok=True)
        config.save_pretrained(out_dir)
        with atomic_write(os.path.join(out_dir, "model.safetensors")) as f:
            f.write(save(sd, metadata={"format": "pt"}))
        tokenizer_files = []
        if vocab == GPT2_VOCAB:  # a smaller vocabulary is not GPT-2's tokens
            tokenizer_files = save_hf_tokenizer(out_dir, model.config.block_size)
    except OSError as e:  # the checkpoint is only read: it is safe whatever happens here
        raise UserError("--export-hf: " + os_error_message(e, out_dir + "/",
                                                           "the checkpoint is untouched")) from None
    return ["config.json", "model.safetensors"] + tokenizer_files


def export(model, args):
    """--export-hf DIR and --export-gguf FILE [--gguf-type f16|f32], those given: the
    model written there -> what was written, a line each."""
    lines = []
    if hasattr(args, "export_hf"):
        lines.append(f"wrote {args.export_hf}/: {', '.join(export_hf(model, args.export_hf))}")
    if hasattr(args, "export_gguf"):
        weight_type = getattr(args, "gguf_type", "f16")
        size = export_gguf(model, args.export_gguf, weight_type)
        lines.append(f"wrote {args.export_gguf}: {size / 1e6:,.1f} MB, {weight_type} weights, "
                     "llama.cpp's gpt2 architecture with GPT-2's tokenizer")
    return "\n".join(lines)

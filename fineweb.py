"""
FineWeb-Edu, or your own text, tokenized with GPT-2's tokenizer into shards for train_gpt2.py.

    python fineweb.py                # FineWeb-Edu sample-10BT -> edu_fineweb10B/ (needs internet)
    python fineweb.py --streaming    # the same, tokenizing while it downloads
    python fineweb.py --input notes.txt books.jsonl web.parquet --prefix mine  # -> data/mine/

Every document becomes [EOT, *its tokens] (GPT-2 separates documents with <|endoftext|>), and
the documents, in order, form one token stream. Its first --val-split-tokens tokens are shard
0, the validation split; the rest is cut into training shards of exactly --shard-size tokens
(100M), the last holding the rest; a document that does not fit spills into the next shard.
The shards are numbered across both splits like build-nanogpt's: {prefix}_val_000000.bin,
{prefix}_train_000001.bin, ... FineWeb-Edu keeps build-nanogpt's layout, a val shard as large
as the others; your own text gets a tenth of it as val, at most 10M tokens, so a corpus of a
few MB and one of 100 GB both give both splits. A corpus without a training window (513
tokens) for each split is refused.

A shard is an llm.c .bin file: 256 little-endian int32 (MAGIC, VERSION, token count, zeros)
and then the tokens as uint16, so llm.c's C trainer reads our shards and we read its shards.

Local inputs: a .txt file is one document; .jsonl/.json and .parquet hold one document per
record in its "text" field and are read through Hugging Face `datasets`, like the hub data.

Safe to kill: a shard gets its final name only once it is complete and on disk, and
{prefix}_manifest.json records where each shard starts. Run the same command again and it
resumes from the first missing or damaged shard, ending with the same bytes as an uninterrupted
run; a finished run with unchanged inputs returns at once. Nothing is lost by mistake: one
--out-dir takes one run at a time, and the shards of another input or size under the same
--out-dir and --prefix are kept (and the run refused) unless you pass --overwrite. A run that
fails before its first shard leaves nothing behind.

From Python (train_gpt2.py does this for its shakespeare preset, with sizes of its own):

    from fineweb import tokenize_local, list_shards, load_shard
    tokenize_local(["input.txt"], "data/shakespeare", prefix="shakespeare")
    tokens = load_shard(list_shards("data/shakespeare", "train")[0])  # read-only uint16 memmap
"""

import contextlib
import itertools
import json
import os
import re
import shlex
import signal
import sys
import time

import numpy as np

from common import (ArgumentParser, DirLock, Range, UserError, atomic_write, hub_offline,
                    run_cli, why_hub_unreachable)
from tokenizer import EOT, get_encoding

HERE = os.path.dirname(os.path.abspath(__file__))

MAGIC = 20240520   # llm.c's shard magic (dev/data/data_common.py, write_datafile)
VERSION = 1        # llm.c's version 1: tokens are uint16
HEADER_INTS = 256  # the header is 256 int32: magic, version, token count, then zeros
HEADER_BYTES = HEADER_INTS * 4

FINEWEB = "HuggingFaceFW/fineweb-edu"
FINEWEB_DIR = "edu_fineweb10B"  # where build-nanogpt puts it, and train_gpt2.py looks
LOCAL_FORMATS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
DOCS_PER_TASK = 256          # documents a worker gets at once: ~1 MB of text, so pipes are cheap
SMALL_INPUT_BYTES = 8 << 20  # less takes under a second on one core: not worth a pool
MAX_WORKERS = 1024           # more processes than any machine has cores only costs memory
SHARD_SIZE = 10**8           # tokens per training shard: build-nanogpt's
VAL_SPLIT_MAX = 10**7        # a local corpus's val split: a tenth of it, at most this
# A training run reads windows of batch-size x seq-len + 1 tokens from each split; the
# smallest preset's (shakespeare, 4 x 128) is the least a corpus must give both splits.
MIN_SPLIT_TOKENS = 4 * 128 + 1


class ShardError(UserError):
    """A shard file we cannot read; the message names the file and what was expected."""


class InputError(UserError):
    """An input we cannot tokenize; the message names it and says what to do."""


# -----------------------------------------------------------------------------
# shard files

def write_shard(path, tokens):
    """Writes a 1-D uint16 token array as an llm.c .bin shard, atomically."""
    if not (isinstance(tokens, np.ndarray) and tokens.dtype == np.uint16 and tokens.ndim == 1):
        raise TypeError(f"write_shard wants a 1-D uint16 numpy array, got {tokens!r:.80}")
    if len(tokens) >= 2**31:
        raise ValueError(f"{path}: {len(tokens)} tokens do not fit the int32 count of the header")
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[:3] = MAGIC, VERSION, len(tokens)
    body = np.ascontiguousarray(tokens, dtype="<u2")  # no copy on a little-endian machine
    with atomic_write(path) as f:
        f.write(header.tobytes())
        f.write(memoryview(body))


def load_shard(path):
    """The tokens of an llm.c .bin or build-nanogpt .npy shard: a read-only uint16 memmap."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ShardError(f"{path}: no such shard file")
    if path.endswith(".npy"):
        try:
            tokens = np.load(path, mmap_mode="r")
        except (ValueError, OSError) as e:
            raise ShardError(f"{path}: not a readable .npy file ({e})") from None
        if tokens.dtype != np.uint16 or tokens.ndim != 1:
            raise ShardError(f"{path}: holds {tokens.dtype} of shape {tokens.shape}, "
                             "expected 1-D uint16 tokens as build-nanogpt's fineweb.py writes")
        return tokens
    if not path.endswith(".bin"):
        raise ShardError(f"{path}: unknown shard type, expected .bin (llm.c) "
                         "or .npy (build-nanogpt)")
    size = os.path.getsize(path)
    header = np.fromfile(path, dtype="<i4", count=HEADER_INTS)
    if len(header) < HEADER_INTS:
        raise ShardError(f"{path}: {size} bytes, shorter than the {HEADER_BYTES}-byte header "
                         "of an llm.c .bin shard")
    if header[0] != MAGIC:
        raise ShardError(f"{path}: wrong magic {header[0]}, expected {MAGIC} (llm.c .bin shard)")
    if header[1] != VERSION:
        raise ShardError(f"{path}: version {header[1]}, expected {VERSION} (uint16 tokens)")
    count = int(header[2])
    if size != HEADER_BYTES + 2 * count:
        raise ShardError(f"{path}: {size} bytes, but its header announces {count} tokens "
                         f"({HEADER_BYTES + 2 * count} bytes): truncated or damaged, re-create it")
    if count == 0:  # mmap cannot map zero bytes
        tokens = np.zeros(0, dtype=np.uint16)
        tokens.flags.writeable = False
        return tokens
    return np.memmap(path, dtype="<u2", mode="r", offset=HEADER_BYTES, shape=(count,))


# {prefix}_{split}_{6 digits}.bin (ours, llm.c's) or .npy (build-nanogpt's). The split is the
# part right before the number, so a prefix like "my_train_set" does not make a val shard train.
SHARD_NAME = re.compile(r"(?P<prefix>.+)_(?P<split>train|val)_\d{6}\.(?:bin|npy)")


def list_shards(data_dir, split):
    """Sorted full paths of the .bin/.npy shards of `split` ("train" or "val") in data_dir."""
    if not os.path.isdir(data_dir):
        return []
    names = [n for n in os.listdir(data_dir)
             if (match := SHARD_NAME.fullmatch(n)) and match["split"] == split]
    return sorted(os.path.join(data_dir, n) for n in names)


def shard_name(prefix, index):
    return f"{prefix}_{'val' if index == 0 else 'train'}_{index:06d}.bin"


def _check_prefix(prefix):
    if not prefix or os.sep in prefix or "/" in prefix:
        raise InputError(f"--prefix {prefix!r}: give a plain file name prefix, like 'mine'")
    # build-nanogpt's loader and llm.c's globs (-i "dir/mine_train_*.bin") find the split as
    # a substring: with --prefix my_train_set, they would also train on the val shard
    if "_train_" in f"{prefix}_" or "_val_" in f"{prefix}_":
        raise InputError(f"--prefix {prefix}: '_train_' or '_val_' in it, or '_train'/'_val' "
                         "at its end, makes other readers misread the split; choose another")


# -----------------------------------------------------------------------------
# documents, always in the same order: resuming counts on it

def _first_line(error):
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def _is_json(path):
    return LOCAL_FORMATS.get(os.path.splitext(path)[1].lower()) == "json"


def _json_problem(path):
    """The first line of a .json/.jsonl file that json cannot read, or that holds a lone
    surrogate (pyarrow refuses it, Python's json does not), as "line N ..."; None if none."""
    with open(path, "rb") as f:
        is_array = f.read(1 << 16).lstrip().startswith(b"[")
        f.seek(0)
        chunks = [f.read()] if is_array else f  # an array is one document; else one per line
        for number, chunk in enumerate(chunks, 1):
            chunk = chunk.rstrip()  # or json places an error at the end on the next line
            try:
                record = json.loads(chunk) if chunk else {}
                # a lone surrogate anywhere in the record cannot be encoded as UTF-8
                json.dumps(record, ensure_ascii=False).encode("utf-8")
            except json.JSONDecodeError as e:
                return f"line {number + e.lineno - 1} is not JSON ({e.msg}, column {e.colno})"
            except UnicodeDecodeError as e:
                newlines = chunk.count(b"\n", 0, e.start)
                return f"line {number + newlines} is not UTF-8 ({e.reason})"
            except UnicodeEncodeError:
                where = "a string" if is_array else f"line {number}"
                return (f"{where} holds a lone surrogate (half of a UTF-16 pair, like "
                        "\\ud800), which is not text")
            if not is_array and not isinstance(record, dict):
                return f"line {number} is not a JSON object ({{...}}), so not a record"
    return None


def _is_blank(path):
    with open(path, "rb") as f:
        return not f.read(1 << 16).strip()  # whitespace only, as far as is cheap to look


def _input_error(label, message):
    """The error for a file datasets failed on. Its messages for a bad JSON line name neither
    the file nor the line, so for a JSON file we read it again to find the line."""
    problem = _json_problem(label) if _is_json(label) and os.path.isfile(label) else None
    if problem:
        return InputError(f"{label}: {problem}; fix or remove it")
    return InputError(f"{label}: {message}")


def _load(datasets, label, hint, path, streaming, **kwargs):
    try:
        ds = datasets.load_dataset(path, split="train", streaming=streaming, **kwargs)
    except Exception as e:  # datasets and pyarrow raise many kinds; the user needs the file
        raise _input_error(label, f"cannot load it ({_first_line(e)}); {hint}") from None
    features = ds.features  # None for a streaming dataset that has not been read yet
    if features is not None:
        if "text" not in features:
            raise InputError(f"{label}: records have no 'text' field (they have: "
                             f"{', '.join(features)}); put each document's text in 'text'")
        if getattr(features["text"], "dtype", None) not in ("string", "large_string"):
            raise InputError(f"{label}: 'text' holds {features['text']}, expected strings")
        ds = ds.select_columns(["text"])  # don't turn the other columns into Python objects
    if hasattr(ds, "data") and ds.data.column("text").null_count:  # on disk: find it before work
        import pyarrow.compute as pc
        missing = pc.index(ds.data.column("text").is_null(), True).as_py()
        raise InputError(f"{label}: record {missing + 1} has no 'text'; every record needs one")
    return ds


@contextlib.contextmanager
def _local_sources(paths, streaming):
    """Yields [(path, dataset)] in order; the dataset is None for a .txt file, read in its turn."""
    kinds = [LOCAL_FORMATS[os.path.splitext(p)[1].lower()] for p in paths]
    if all(kind == "text" for kind in kinds):  # don't pay for importing datasets
        yield [(p, None) for p in paths]
        return
    import datasets
    # Local files load in seconds: datasets' progress bars would be noise, and it logs read
    # errors that we raise again as one line naming the file.
    verbosity = datasets.logging.get_verbosity()
    bars_were_off = datasets.are_progress_bars_disabled()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)
    datasets.disable_progress_bars()
    hint = "check that it is complete and in the format its extension says"
    try:
        yield [(p, None) if kind == "text" else
               (p, _load(datasets, p, hint, kind, streaming, data_files=[p]))
               for p, kind in zip(paths, kinds)]
    finally:
        datasets.logging.set_verbosity(verbosity)
        if not bars_were_off:
            datasets.enable_progress_bars()


@contextlib.contextmanager
def _fineweb_sources(name, streaming):
    # asked first: datasets would retry an unreachable hub for half a minute. With
    # HF_HUB_OFFLINE set, datasets reads its own cache at once (a copy from an earlier run).
    if not hub_offline() and (reason := why_hub_unreachable()):
        raise InputError(f"{FINEWEB} is on the Hugging Face hub, which is out of reach "
                         f"({reason}); tokenize files on this machine instead: "
                         "python fineweb.py --input FILE...")
    import datasets
    hint = ("HF_HUB_OFFLINE is set, so only a copy in the Hugging Face cache is read: unset it, "
            "or tokenize local files with --input" if hub_offline() else
            "check the internet connection and --name, or tokenize local files with --input")
    yield [(FINEWEB, _load(datasets, f"{FINEWEB} ({name})", hint, FINEWEB, streaming, name=name))]


def _read_text(path):
    try:
        with open(path, encoding="utf-8", newline="") as f:  # newline="": the exact text
            return f.read()
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: not UTF-8 ({e.reason} at byte {e.start}); "
                         "convert it first") from None


def _documents(sources, start):
    """The texts of all documents in order, from document number `start` on."""
    for label, ds in sources:
        if ds is None:  # a .txt file: one document
            if start:
                start -= 1
            else:
                yield _read_text(label)
            continue
        if start and hasattr(ds, "__len__"):  # on disk: jump ahead without reading
            if start >= len(ds):
                start -= len(ds)
                continue
            ds, start = ds.skip(start), 0
        try:
            for batch in ds.iter(batch_size=DOCS_PER_TASK):
                texts = batch.get("text")
                if texts is None or not all(isinstance(t, str) for t in texts):
                    raise InputError(f"{label}: a record has no 'text' string; "
                                     "every record needs one")
                if start:  # a streaming dataset can only skip by reading
                    texts, start = texts[start:], max(0, start - len(texts))
                yield from texts
        except InputError:
            raise
        except Exception as e:
            raise _input_error(label, f"reading failed ({_first_line(e)})") from None


def _tasks(documents, first_doc):
    """(index of the first document, its texts) for DOCS_PER_TASK documents at a time."""
    while texts := list(itertools.islice(documents, DOCS_PER_TASK)):
        yield first_doc, texts
        first_doc += len(texts)


# -----------------------------------------------------------------------------
# tokenizing and cutting shards

def encode_documents(texts):
    """[EOT, *doc 0, EOT, *doc 1, ...] for a list of texts, as one uint16 array."""
    enc = get_encoding()
    parts = []
    for text in texts:
        try:
            # With no special tokens allowed or forbidden this is encode_ordinary (the tests
            # check), but the tokens come back in a buffer instead of a Python list of ints,
            # and unlike encode_ordinary_batch it starts no thread per call.
            parts.append(enc.encode_to_numpy(text, disallowed_special=()))
        except UnicodeEncodeError:  # a lone surrogate: encode_ordinary knows how to repair it
            parts.append(enc.encode_ordinary(text))
    tokens = np.empty(len(parts) + sum(map(len, parts)), dtype=np.uint16)
    pos = 0
    for ids in parts:
        tokens[pos] = EOT
        tokens[pos + 1:pos + 1 + len(ids)] = ids
        pos += 1 + len(ids)
    return tokens


def _end_with_parent():
    """Pool initializer: the worker ends when the process that started it dies, even by
    kill -9, instead of tokenizing on for nobody. (A worker orphaned before this runs has no
    task yet: it ends when its task pipe closes.) It ignores Ctrl-C, which the parent
    answers (see _worker_pool)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    parent = os.getppid()
    if sys.platform.startswith("linux"):
        import ctypes
        # <linux/prctl.h>: the kernel sends the signal when the thread that forked us ends;
        # that is the one that runs the whole pool
        PR_SET_PDEATHSIG = 1
        try:
            if ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGKILL) == 0:
                return
        except (OSError, AttributeError):  # no prctl in this libc: watch instead
            pass
    import threading
    threading.Thread(target=_exit_when_orphaned, args=(parent,), daemon=True).start()


def _exit_when_orphaned(parent):
    while os.getppid() == parent:  # a dead parent's children get another one
        time.sleep(0.5)
    os._exit(1)


def _encode_task(task):  # what a pool worker runs: top level, so it pickles on every platform
    first_doc, texts = task
    return first_doc, encode_documents(texts)


def pack_shards(encoded, shard_size, skip=0, first_size=None):
    """Cuts a token stream into shards of exactly shard_size tokens, the last holding the rest;
    the first shard holds first_size tokens instead when given (the val split).

    encoded yields (first_doc, tokens) in document order; the first `skip` tokens are dropped
    (a resumed run restarts at a document that the last shard already holds part of). Yields
    (shard, resume): shard is a view of one reused buffer, so write it before asking for the
    next; resume = (document, tokens to skip) is where the stream after this shard starts.
    """
    size = first_size or shard_size
    buffer = np.empty(max(size, shard_size), dtype=np.uint16)  # never a Python list of tokens
    filled = 0
    for first_doc, tokens in encoded:
        pos = min(skip, len(tokens))
        skip -= pos
        while pos < len(tokens):
            n = min(size - filled, len(tokens) - pos)
            buffer[filled:filled + n] = tokens[pos:pos + n]
            filled, pos = filled + n, pos + n
            if filled == size:
                yield buffer[:size], (first_doc, pos)
                filled, size = 0, shard_size
    if filled:
        yield buffer[:filled], None


# -----------------------------------------------------------------------------
# a whole run: manifest, resume, pool
#
# {prefix}_manifest.json tells what the shards of one prefix hold:
#   key     what they are made of (inputs, shard size, tokenizer); another key is another run
#   shards  name -> {"tokens": count, "start": [document, tokens to skip] where the shard
#           begins in the token stream, "largest_id": its largest token id}
#   resume  [document, tokens to skip] where the next shard begins
#   done    whether the last shard is written

def _manifest_path(out_dir, prefix):
    return os.path.join(out_dir, f"{prefix}_manifest.json")


def _read_manifest(path):
    """The manifest at path, or None when there is none we can read."""
    try:
        with open(path) as f:
            state = json.load(f)
    except (OSError, ValueError):
        return None
    if not (isinstance(state, dict) and isinstance(state.get("shards"), dict)
            and {"key", "resume", "done"} <= state.keys()):
        return None
    # a manifest from before shards had records holds only each one's token count
    state["shards"] = {name: record if isinstance(record, dict) else {"tokens": record}
                       for name, record in state["shards"].items()}
    return state


def _write_manifest(path, state):
    with atomic_write(path, "w") as f:
        json.dump(state, f, indent=1)


def largest_token_id(data_dir):
    """The largest token id in the shards of data_dir, read from the manifests beside them
    (no shard is opened), so a trainer can refuse a vocab_size too small for the data before
    it starts. None when some shard has no such record (made elsewhere, or by an older
    fineweb.py): then only reading the shards could tell."""
    manifests = [n for n in os.listdir(data_dir) if n.endswith("_manifest.json")] \
        if os.path.isdir(data_dir) else []
    records = {}
    for name in manifests:
        records.update((_read_manifest(os.path.join(data_dir, name)) or {"shards": {}})["shards"])
    largest = [records.get(os.path.basename(path), {}).get("largest_id")
               for path in list_shards(data_dir, "val") + list_shards(data_dir, "train")]
    return None if not largest or None in largest else max(largest)


def _command(key, out_dir, prefix, same_key):
    """The fineweb.py command that makes the shards a manifest's key describes: that key
    exactly (to resume its run), or else with today's defaults for the layout."""
    local = "inputs" in key
    args = ["--input", *(i["path"] for i in key["inputs"])] if local else \
        [] if key["name"] == "sample-10BT" else ["--name", key["name"]]
    args += ["--out-dir", out_dir]
    if prefix != ("local" if local else "edufineweb"):
        args += ["--prefix", prefix]
    if same_key and key["shard_size"] != SHARD_SIZE:
        args += ["--shard-size", str(key["shard_size"])]
    val = key.get("val_split_tokens", key["shard_size"])  # absent: shard 0 is a whole shard
    if same_key and isinstance(val, int) and (local or val != key["shard_size"]):
        args += ["--val-split-tokens", str(val)]
    return shlex.join(["python", "fineweb.py", *args])


def check_splits(data_dir):
    """Raises an InputError unless data_dir holds a val and a training split of each prefix
    there: a training run asks before it builds anything, and the line names the fineweb.py
    command that makes what is missing."""
    counts = {}  # prefix -> [val shards, train shards]
    for i, split in enumerate(["val", "train"]):
        for path in list_shards(data_dir, split):
            prefix = SHARD_NAME.fullmatch(os.path.basename(path))["prefix"]
            counts.setdefault(prefix, [0, 0])[i] += 1
    lacking = sorted(prefix for prefix, (val, train) in counts.items() if not (val and train))
    if counts and not lacking:
        return
    quoted = shlex.quote(os.fspath(data_dir))
    if not counts and os.path.basename(os.path.normpath(data_dir)) == FINEWEB_DIR:
        raise InputError(f"no shards in {data_dir}/: run `python fineweb.py` to make them "
                         "(FineWeb-Edu, 10B tokens, needs the internet), or `python fineweb.py "
                         "--input FILE... --out-dir DIR` for your own text and then --data-dir "
                         "DIR, or try `python train_gpt2.py --preset shakespeare`")
    if not counts:
        raise InputError(f"no shards in {data_dir}/: make them from your own text with "
                         f"`python fineweb.py --input FILE... --out-dir {quoted}`")
    found = ", ".join(f"{p}: {val} val and {train} train shard(s)"
                      for p, (val, train) in sorted(counts.items()))
    prefix = lacking[0]
    state = _read_manifest(_manifest_path(data_dir, prefix))
    if state and (not state["done"] or _first_damaged(data_dir, state["shards"]) is not None):
        todo = "its fineweb.py run did not finish, or a shard it wrote is gone; run it again: " \
            f"`{_command(state['key'], os.fspath(data_dir), prefix, same_key=True)}`"
    elif state:
        todo = "an older fineweb.py put all of a corpus smaller than --shard-size in val; " \
            f"make both splits with " \
            f"`{_command(state['key'], os.fspath(data_dir), prefix, same_key=False)} --overwrite`"
    else:
        todo = f"make both splits with `python fineweb.py --input FILE... --out-dir {quoted}" + \
            ("`" if prefix == "local" else f" --prefix {shlex.quote(prefix)}`") + \
            " (--overwrite replaces these)"
    raise InputError(f"{data_dir}/ holds {found}, and a run needs a val and a train split of "
                     f"each prefix: {todo}")


def _first_damaged(out_dir, shards):
    """The index of the first recorded shard that is missing or not as recorded, or None."""
    for i, (name, record) in enumerate(shards.items()):
        try:
            if len(load_shard(os.path.join(out_dir, name))) == record["tokens"]:
                continue
        except ShardError:
            pass
        return i
    return None


def _up_to_date(out_dir, prefix, key):
    """The shard paths when a finished run with this key left them all intact, else None."""
    state = _read_manifest(_manifest_path(out_dir, prefix))
    if not state or state["key"] != key or not state["done"] or \
            _first_damaged(out_dir, state["shards"]) is not None:
        return None
    print(f"{prefix}: {len(state['shards'])} shards in {out_dir} are up to date")
    return [os.path.join(out_dir, name) for name in state["shards"]]


def _remove_temp_files(out_dir, prefix):
    # atomic_write's temp files (.NAME.PID.tmp) that a killed run of this prefix left behind:
    # no other process writes them while we hold the lock
    ours = re.compile(r"\." + re.escape(prefix) +
                      r"_(?:(?:val|train)_\d{6}\.bin|manifest\.json)\.\d+\.tmp")
    for name in os.listdir(out_dir):
        if ours.fullmatch(name):
            os.remove(os.path.join(out_dir, name))


def _tidy_finished(out_dir, prefix):
    """The temp files of a run killed after its last shard (while it rewrote the manifest),
    removed when no run holds the lock; a read-only or busy out_dir is left as it is."""
    try:
        lock = DirLock(out_dir, "fineweb.py run")
    except (UserError, OSError):
        return
    try:
        _remove_temp_files(out_dir, prefix)
    except OSError:
        pass
    finally:
        lock.release()


def _start_over(out_dir, prefix, key, old_state, overwrite):
    """A state for a run from the first document. The prefix's shards already in out_dir
    are made by another run: they are removed only when `overwrite`, never silently."""
    ours = sorted(n for n in os.listdir(out_dir)
                  if (match := SHARD_NAME.fullmatch(n)) and match["prefix"] == prefix)
    manifest = _manifest_path(out_dir, prefix)
    if ours and not overwrite:
        name = os.path.basename(manifest)
        made_by = f"are of another input, --shard-size or --val-split-tokens (see {name})" \
            if old_state else f"have no {name} that says what they hold"
        raise InputError(f"{out_dir}: its {len(ours)} {prefix} shards {made_by}; keep them by "
                         "writing these with another --out-dir or --prefix, or replace them "
                         "with --overwrite")
    # The manifest goes first: killed while removing, the shards left have none and are
    # refused again instead of passing for this run's.
    if os.path.exists(manifest):
        os.remove(manifest)
    for name in ours:
        os.remove(os.path.join(out_dir, name))
    if ours:
        print(f"{prefix}: removed {len(ours)} shards of another run from {out_dir} (overwrite)")
    # no manifest yet: _tokenize writes it just before the first shard, so a run that fails
    # before one leaves nothing behind
    return {"key": key, "shards": {}, "resume": [0, 0], "done": False}


def _start(out_dir, prefix, key, overwrite):
    """The state a run starts from: the same key resumes, from the first missing or damaged
    shard if there is one (re-tokenizing writes the same bytes, so nothing after it is lost)."""
    state = _read_manifest(_manifest_path(out_dir, prefix))
    if not state or state["key"] != key:
        return _start_over(out_dir, prefix, key, state, overwrite)
    damaged = _first_damaged(out_dir, state["shards"])
    if damaged is not None:
        names = list(state["shards"])
        first = damaged if "start" in state["shards"][names[damaged]] else 0  # older manifest
        print(f"{prefix}: {names[damaged]} is missing or damaged; tokenizing again from "
              f"{'it' if first == damaged else names[first]} on, keeping the {first} "
              "shard(s) before it")
        state["resume"] = state["shards"][names[first]].get("start", [0, 0])
        state["shards"] = {name: state["shards"][name] for name in names[:first]}
        state["done"] = False
    return state


def _read_ahead(encoded, val_split_tokens, corpus):
    """(the same stream, the size of its val split), reading ahead only as far as it takes
    to know that size and that the corpus holds both splits. With val_split_tokens None the
    val split is a tenth of the corpus, at most VAL_SPLIT_MAX: a corpus whose size nobody
    knows before it is tokenized (a stream, a .txt file) then keeps up to ten times that in
    memory (200 MB) until it is known. Too small a corpus is refused before a file is written."""
    enough = (val_split_tokens or 10 * VAL_SPLIT_MAX) + MIN_SPLIT_TOKENS
    chunks, total = [], 0
    for chunk in encoded:
        chunks.append(chunk)
        total += len(chunk[1])
        if total >= enough:
            return itertools.chain(chunks, encoded), val_split_tokens or VAL_SPLIT_MAX
    val = val_split_tokens or min(VAL_SPLIT_MAX, total // 10)
    if min(val, total - val) < MIN_SPLIT_TOKENS:
        need, split, todo = (val_split_tokens + MIN_SPLIT_TOKENS, f"--val-split-tokens {val:,}",
                             " or a smaller --val-split-tokens") if val_split_tokens else \
            (10 * MIN_SPLIT_TOKENS, "a tenth", "")
        raise InputError(f"{corpus}: {total:,} token{'s' * (total != 1)}, too few to train on: "
                         f"a run needs at least {need:,}, so that the val split ({split}) and "
                         f"the training split each hold one window of {MIN_SPLIT_TOKENS} "
                         f"tokens (4 x 128 + 1, what --preset shakespeare reads); give more "
                         f"text{todo}")
    return iter(chunks), val


@contextlib.contextmanager
def _ignoring_sigint():
    """Ctrl-C ignored inside the block, where the main thread can set it. Processes started
    here inherit that, spawned ones too: Python keeps an ignored SIGINT ignored."""
    try:
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    except ValueError:  # not the main thread, which alone gets signals anyway
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


@contextlib.contextmanager
def _worker_pool(workers):
    """A pool of tokenizer processes, or None for workers=1. Ctrl-C reaches the whole process
    group: the workers ignore it, so only the parent says what happened, and the pool ends
    them as the parent leaves this block."""
    if workers == 1:
        yield None
        return
    import multiprocessing
    with _ignoring_sigint():
        pool = multiprocessing.Pool(workers, _end_with_parent)
    with pool:
        yield pool


def _counting(encoded, bar):
    for chunk in encoded:
        bar.update(len(chunk[1]))
        yield chunk


@contextlib.contextmanager
def _progress_bar(prefix, initial, shards):
    """tqdm's bar of the tokens read. It shows after a second, so a run refused at once
    prints its error line alone, and one that fails later clears it from the terminal."""
    from tqdm import tqdm
    with tqdm(desc=prefix, unit="tok", unit_scale=True, initial=initial, delay=1,
              postfix={"shards": shards}) as bar:
        try:
            yield bar
        except BaseException:
            bar.leave = False  # close() then clears the line
            raise


def _tokenize(sources, state, out_dir, prefix, shard_size, workers, val_split_tokens, corpus):
    """Writes the shards from state["resume"] on, recording each in the manifest."""
    assert get_encoding().n_vocab <= 2**16, "token ids must fit in uint16"
    manifest = _manifest_path(out_dir, prefix)
    start_doc, skip = state["resume"]
    # the bar counts tokens read: the stream restarts `skip` tokens before the first new one
    written = sum(record["tokens"] for record in state["shards"].values()) - skip
    # The pool first: forked workers then inherit the tokenizer but none of datasets' threads.
    with _worker_pool(workers) as pool, sources as docs_sources, \
            _progress_bar(prefix, written, len(state["shards"])) as bar:
        tasks = _tasks(_documents(docs_sources, start_doc), start_doc)
        encoded = _counting(pool.imap(_encode_task, tasks) if pool else
                            map(_encode_task, tasks), bar)
        t0, new_tokens, val_size = time.time(), 0, None
        if not state["shards"]:  # from the start, so the val split comes first
            encoded, val_size = _read_ahead(encoded, val_split_tokens, corpus)
        for shard, resume in pack_shards(encoded, shard_size, skip, val_size):
            name = shard_name(prefix, len(state["shards"]))
            if not state["shards"]:  # before a shard: one written just before a kill is ours
                _write_manifest(manifest, state)
            write_shard(os.path.join(out_dir, name), shard)
            state["shards"][name] = {"tokens": len(shard), "start": state["resume"],
                                     "largest_id": int(shard.max())}
            state["resume"], state["done"] = resume, resume is None
            _write_manifest(manifest, state)
            bar.set_postfix(shards=len(state["shards"]), refresh=False)  # shown by update
            new_tokens += len(shard)
        seconds = time.time() - t0
    state["done"] = True
    _write_manifest(manifest, state)
    print(f"{prefix}: {new_tokens:,} tokens tokenized in {seconds:.1f} s "
          f"({new_tokens / max(seconds, 1e-9) / 1e6:.2f}M tokens/s with {workers} process(es)); "
          f"{len(state['shards'])} shards in {out_dir}")


def build_shards(sources, key, out_dir, prefix, shard_size, workers, overwrite=False, *,
                 val_split_tokens=None, corpus="the corpus"):
    """Tokenizes the documents of `sources` (a context manager yielding them) into shards in
    out_dir, recording progress in {prefix}_manifest.json: does nothing when a finished run
    with the same `key` left them intact, resumes an unfinished one, and replaces the shards
    of another key only with `overwrite`. Shard 0, the val split, holds val_split_tokens
    tokens (None: a tenth of the corpus, at most VAL_SPLIT_MAX), the training shards
    shard_size each; `corpus` names the input in errors. Returns the shard paths."""
    for name, size in [("shard_size", shard_size), ("val_split_tokens", val_split_tokens)]:
        if size is not None and not 0 < size < 2**31:
            raise ValueError(f"{name} must be between 1 and 2**31 - 1, got {size}")
    _check_prefix(prefix)
    made_out_dir = not os.path.isdir(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    # Read-only, without the lock: runs that only use the shards (every shakespeare training
    # run asks) never get in each other's way.
    paths = _up_to_date(out_dir, prefix, key)
    if paths is not None:
        _tidy_finished(out_dir, prefix)
        return paths
    lock = DirLock(out_dir, "fineweb.py run")  # two writers would mix their shards
    try:
        _remove_temp_files(out_dir, prefix)
        state = _start(out_dir, prefix, key, overwrite)
        if not state["done"]:  # done: another run finished them since we looked
            _tokenize(sources, state, out_dir, prefix, shard_size, workers, val_split_tokens,
                      corpus)
    except BaseException:
        if made_out_dir:  # a failed first run leaves no empty directory behind
            with contextlib.suppress(OSError):
                os.rmdir(out_dir)  # only when empty: what a run left to resume from stays
        raise
    finally:
        lock.release()
    return [os.path.join(out_dir, name) for name in state["shards"]]


def _layout(key, shard_size, val_split_tokens):
    """The manifest key with the val split's size, which it names only where shard 0 is not
    shard_size tokens, so the shards of runs from before --val-split-tokens are still ours."""
    if val_split_tokens != shard_size:
        key["val_split_tokens"] = val_split_tokens or f"a tenth, at most {VAL_SPLIT_MAX}"
    return key


def tokenize_local(paths, out_dir, *, prefix="local", shard_size=SHARD_SIZE,
                   val_split_tokens=None, workers=None, streaming=False, overwrite=False):
    """Tokenizes local .txt/.jsonl/.json/.parquet files into shards (see the module docstring);
    cached: unchanged inputs return the existing shard paths without tokenizing. Shards of
    other inputs under the same out_dir and prefix are replaced only with overwrite=True."""
    if isinstance(paths, (str, os.PathLike)):  # one file, not the characters of its name
        paths = [paths]
    paths = [os.fspath(p) for p in paths]
    for path in paths:
        if not os.path.isfile(path):
            raise InputError(f"{path}: no such file; check the path")
        if os.path.splitext(path)[1].lower() not in LOCAL_FORMATS:
            raise InputError(f"{path}: unknown extension; give .txt (one document per file), "
                             ".jsonl/.json or .parquet (one document per record, in 'text')")
        if _is_json(path) and _is_blank(path):
            raise InputError(f"{path}: empty, no records; give it one JSON object per line, "
                             'like {"text": "a document"}')
    stats = [os.stat(p) for p in paths]
    key = {"inputs": [{"path": os.path.abspath(p), "bytes": s.st_size, "mtime_ns": s.st_mtime_ns}
                      for p, s in zip(paths, stats)],
           "shard_size": shard_size, "tokenizer": "gpt2, EOT before each document"}
    if workers is None:
        small = sum(s.st_size for s in stats) < SMALL_INPUT_BYTES
        workers = 1 if small else os.cpu_count() or 1
    corpus = paths[0] if len(paths) == 1 else f"{len(paths)} input files together"
    return build_shards(_local_sources(paths, streaming), _layout(key, shard_size,
                        val_split_tokens), out_dir, prefix, shard_size, workers, overwrite,
                        val_split_tokens=val_split_tokens, corpus=corpus)


def tokenize_fineweb(out_dir=FINEWEB_DIR, *, name="sample-10BT", prefix="edufineweb",
                     shard_size=SHARD_SIZE, val_split_tokens=None, workers=None,
                     streaming=False, overwrite=False):
    """Downloads FineWeb-Edu's `name` subset from the Hugging Face hub and tokenizes it; its
    val split is shard_size tokens, as in build-nanogpt, unless val_split_tokens says."""
    key = {"dataset": FINEWEB, "name": name, "shard_size": shard_size,
           "tokenizer": "gpt2, EOT before each document"}
    val_split_tokens = val_split_tokens or shard_size
    return build_shards(_fineweb_sources(name, streaming), _layout(key, shard_size,
                        val_split_tokens), out_dir, prefix, shard_size,
                        workers or os.cpu_count() or 1, overwrite,
                        val_split_tokens=val_split_tokens, corpus=f"{FINEWEB} ({name})")


def prepare_run_data(cfg, master=True, barrier=None):
    """The shards of a training run (config.TrainConfig cfg): for the shakespeare preset,
    input.txt tokenized once (cached); then the run's shards checked before any is read.
    master: this process tokenizes; barrier: waits for every rank (None: one process)."""
    if cfg.preset == "shakespeare" and not cfg.data_dir:
        cfg.data_dir = os.path.join(HERE, "data", "shakespeare")
        if master:
            # the script's own cache, replaced when input.txt changes; 2**15 tokens per
            # shard, val included, so val holds about a tenth of the text as it always has
            tokenize_local([os.path.join(HERE, "input.txt")], cfg.data_dir,
                           prefix="shakespeare", shard_size=2 ** 15, workers=1,
                           val_split_tokens=2 ** 15, overwrite=True)
        if barrier is not None:
            barrier()
    check_splits(cfg.data_dir)  # both splits, or the fineweb.py command that makes them
    largest = largest_token_id(cfg.data_dir)  # from the manifest: no shard is read
    if largest is not None and largest >= cfg.vocab_size:
        raise UserError(f"{cfg.data_dir}/ holds token id {largest}: use a --vocab-size above "
                        f"it (now {cfg.vocab_size}; GPT-2's: 50304)")


def main(argv=None):
    parser = ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    parser.add_argument("--input", nargs="+", metavar="FILE",
                        help="tokenize these .txt/.jsonl/.json/.parquet files, not FineWeb-Edu")
    parser.add_argument("--name", default="sample-10BT",
                        help="FineWeb-Edu subset on the hub: sample-10BT, sample-100BT, ... "
                        "(default: %(default)s)")
    parser.add_argument("--out-dir", help="shard directory (default: edu_fineweb10B, "
                        "or data/PREFIX with --input)")
    parser.add_argument("--prefix", help="shard file name prefix (default: edufineweb, "
                        "or local with --input)")
    # the header holds a shard's token count as an int32
    parser.add_argument("--shard-size", type=int, default=SHARD_SIZE, range=Range(1, 2**31 - 1),
                        help="tokens per training shard (default: %(default)s)")
    parser.add_argument("--val-split-tokens", type=int, metavar="N",
                        range=Range(MIN_SPLIT_TOKENS, 2**31 - 1),
                        help="tokens in the val split, shard 0 (default: a tenth of the corpus, "
                        f"at most {VAL_SPLIT_MAX:,}, with --input; --shard-size for FineWeb-Edu)")
    parser.add_argument("--workers", type=int, range=Range(1, MAX_WORKERS),
                        help="tokenizer processes (default: one per core; 1 for local inputs "
                        "under 8 MB, where a pool costs more than it saves)")
    parser.add_argument("--streaming", action="store_true", help="read the data while it "
                        "downloads instead of into the Hugging Face cache first")
    parser.add_argument("--overwrite", action="store_true", help="replace the shards that "
                        "another input, --shard-size or --val-split-tokens left under the same "
                        "--out-dir and --prefix (without it they are kept, and the run refused)")
    args = parser.parse_args(argv)
    parser.check_ranges(args, {"shard_size": SHARD_SIZE, "workers": "one per core",
                               "val_split_tokens": "a tenth of --input, at most "
                               f"{VAL_SPLIT_MAX:,}; --shard-size for FineWeb-Edu"})
    try:
        if args.input:
            prefix = args.prefix or "local"
            tokenize_local(args.input, args.out_dir or os.path.join("data", prefix), prefix=prefix,
                           shard_size=args.shard_size, val_split_tokens=args.val_split_tokens,
                           workers=args.workers, streaming=args.streaming,
                           overwrite=args.overwrite)
        else:
            tokenize_fineweb(args.out_dir or FINEWEB_DIR, name=args.name,
                             prefix=args.prefix or "edufineweb", shard_size=args.shard_size,
                             val_split_tokens=args.val_split_tokens, workers=args.workers,
                             streaming=args.streaming, overwrite=args.overwrite)
    except OSError as e:  # an unwritable --out-dir, a full disk
        raise UserError(f"{e.filename or args.out_dir}: {e.strerror or e}") from None
    except KeyboardInterrupt:
        raise UserError("interrupted: run the same command again to resume from the last "
                        "complete shard") from None


if __name__ == "__main__":
    sys.exit(run_cli(main))

"""
FineWeb-Edu, or your own text, tokenized with GPT-2's tokenizer into shards for train_gpt2.py.

    python fineweb.py                # FineWeb-Edu sample-10BT -> edu_fineweb10B/ (needs internet)
    python fineweb.py --streaming    # the same, tokenizing while it downloads
    python fineweb.py --input notes.txt books.jsonl web.parquet --prefix mine  # -> data/mine/

Every document becomes [EOT, *its tokens] (GPT-2 separates documents with <|endoftext|>), and
the documents, in order, form one token stream cut into shards of exactly --shard-size tokens;
a document that does not fit spills into the next shard, and the last shard holds the rest.
Shard 0 is the validation split, the others are training data, numbered across both like
build-nanogpt does: {prefix}_val_000000.bin, {prefix}_train_000001.bin, ...

A shard is an llm.c .bin file: 256 little-endian int32 (MAGIC, VERSION, token count, zeros)
and then the tokens as uint16, so llm.c's C trainer reads our shards and we read its shards.

Local inputs: a .txt file is one document; .jsonl/.json and .parquet hold one document per
record in its "text" field and are read through Hugging Face `datasets`, like the hub data.

Safe to kill: a shard gets its final name only once it is complete and on disk, and
{prefix}_manifest.json records where each shard starts. Run the same command again and it
resumes from the first missing or damaged shard, ending with the same bytes as an uninterrupted
run; a finished run with unchanged inputs returns at once. Nothing is lost by mistake: one
--out-dir takes one run at a time, and the shards of another input or --shard-size under the
same --out-dir and --prefix are kept (and the run refused) unless you pass --overwrite.

From Python (train_gpt2.py does this):

    from fineweb import tokenize_local, list_shards, load_shard
    tokenize_local(["input.txt"], "data/shakespeare", prefix="shakespeare", shard_size=2**15)
    tokens = load_shard(list_shards("data/shakespeare", "train")[0])  # read-only uint16 memmap
"""

import contextlib
import itertools
import json
import os
import re
import signal
import sys
import time

import numpy as np

from common import (ArgumentParser, DirLock, UserError, atomic_write, hub_offline,
                    hub_unreachable, run_cli)
from tokenizer import EOT, get_encoding

HERE = os.path.dirname(os.path.abspath(__file__))

MAGIC = 20240520   # llm.c's shard magic (dev/data/data_common.py, write_datafile)
VERSION = 1        # llm.c's version 1: tokens are uint16
HEADER_INTS = 256  # the header is 256 int32: magic, version, token count, then zeros
HEADER_BYTES = HEADER_INTS * 4

FINEWEB = "HuggingFaceFW/fineweb-edu"
LOCAL_FORMATS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
DOCS_PER_TASK = 256          # documents a worker gets at once: ~1 MB of text, so pipes are cheap
SMALL_INPUT_BYTES = 8 << 20  # less takes under a second on one core: not worth a pool


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
    if not hub_offline() and (reason := hub_unreachable()):
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
            # check), but the tokens come back in a buffer instead of a Python list of ints:
            # ~15% faster than encode_ordinary_batch, which also starts a thread per call.
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
    task yet: it ends when its task pipe closes.)"""
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


def pack_shards(encoded, shard_size, skip=0, progress=None):
    """Cuts a token stream into shards of exactly shard_size tokens, the last holding the rest.

    encoded yields (first_doc, tokens) in document order; the first `skip` tokens are dropped
    (a resumed run restarts at a document that the last shard already holds part of). Yields
    (shard, resume): shard is a view of one reused buffer, so write it before asking for the
    next; resume = (document, tokens to skip) is where the stream after this shard starts.
    """
    buffer = np.empty(shard_size, dtype=np.uint16)  # never a Python list of tokens
    filled = 0
    for first_doc, tokens in encoded:
        pos = min(skip, len(tokens))
        skip -= pos
        while pos < len(tokens):
            n = min(shard_size - filled, len(tokens) - pos)
            buffer[filled:filled + n] = tokens[pos:pos + n]
            filled, pos = filled + n, pos + n
            if progress is not None:
                progress.update(n)
            if filled == shard_size:
                yield buffer, (first_doc, pos)
                filled = 0
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
        made_by = f"are of another input or --shard-size (see {name})" if old_state else \
            f"have no {name} that says what they hold"
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
    state = {"key": key, "shards": {}, "resume": [0, 0], "done": False}
    _write_manifest(manifest, state)  # before a shard: one written just before a kill is ours
    return state


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


def _tokenize(sources, state, out_dir, prefix, shard_size, workers):
    """Writes the shards from state["resume"] on, recording each in the manifest."""
    import multiprocessing
    from tqdm import tqdm
    assert get_encoding().n_vocab <= 2**16, "token ids must fit in uint16"
    manifest = _manifest_path(out_dir, prefix)
    start_doc, skip = state["resume"]
    written = sum(record["tokens"] for record in state["shards"].values())
    # The pool first: forked workers then inherit the tokenizer but none of datasets' threads.
    with (multiprocessing.Pool(workers, _end_with_parent) if workers > 1
          else contextlib.nullcontext()) as pool, \
            sources as docs_sources, \
            tqdm(desc=prefix, unit="tok", unit_scale=True, initial=written,
                 postfix={"shards": len(state["shards"])}) as bar:
        tasks = _tasks(_documents(docs_sources, start_doc), start_doc)
        encoded = pool.imap(_encode_task, tasks) if pool else map(_encode_task, tasks)
        t0, new_tokens = time.time(), 0
        for shard, resume in pack_shards(encoded, shard_size, skip, progress=bar):
            name = shard_name(prefix, len(state["shards"]))
            write_shard(os.path.join(out_dir, name), shard)
            state["shards"][name] = {"tokens": len(shard), "start": state["resume"],
                                     "largest_id": int(shard.max())}
            state["resume"], state["done"] = resume, resume is None
            _write_manifest(manifest, state)
            bar.set_postfix(shards=len(state["shards"]))
            new_tokens += len(shard)
        seconds = time.time() - t0
    state["done"] = True
    _write_manifest(manifest, state)
    print(f"{prefix}: {new_tokens:,} tokens tokenized in {seconds:.1f} s "
          f"({new_tokens / max(seconds, 1e-9) / 1e6:.2f}M tokens/s with {workers} process(es)); "
          f"{len(state['shards'])} shards in {out_dir}")


def build_shards(sources, key, out_dir, prefix, shard_size, workers, overwrite=False):
    """Tokenizes the documents of `sources` (a context manager yielding them) into shards in
    out_dir, recording progress in {prefix}_manifest.json: does nothing when a finished run
    with the same `key` left them intact, resumes an unfinished one, and replaces the shards
    of another key only with `overwrite`. Returns the shard paths."""
    if not 0 < shard_size < 2**31:
        raise ValueError(f"shard_size must be between 1 and 2**31 - 1, got {shard_size}")
    _check_prefix(prefix)
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
            _tokenize(sources, state, out_dir, prefix, shard_size, workers)
    finally:
        lock.release()
    return [os.path.join(out_dir, name) for name in state["shards"]]


def tokenize_local(paths, out_dir, *, prefix="local", shard_size=10**8, workers=None,
                   streaming=False, overwrite=False):
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
    return build_shards(_local_sources(paths, streaming), key, out_dir, prefix, shard_size, workers,
                        overwrite)


def tokenize_fineweb(out_dir="edu_fineweb10B", *, name="sample-10BT", prefix="edufineweb",
                     shard_size=10**8, workers=None, streaming=False, overwrite=False):
    """Downloads FineWeb-Edu's `name` subset from the Hugging Face hub and tokenizes it."""
    key = {"dataset": FINEWEB, "name": name, "shard_size": shard_size,
           "tokenizer": "gpt2, EOT before each document"}
    return build_shards(_fineweb_sources(name, streaming), key, out_dir, prefix, shard_size,
                        workers or os.cpu_count() or 1, overwrite)


def prepare_run_data(cfg, master=True, barrier=None):
    """The shards of a training run (config.TrainConfig cfg): for the shakespeare preset,
    input.txt tokenized once (cached); then the run's shards checked before any is read.
    master: this process tokenizes; barrier: waits for every rank (None: one process)."""
    if cfg.preset == "shakespeare" and not cfg.data_dir:
        cfg.data_dir = os.path.join(HERE, "data", "shakespeare")
        if master:
            # the script's own cache, replaced when input.txt changes; 2**15 tokens per
            # shard, so shard 0 (val) holds about a tenth of the text
            tokenize_local([os.path.join(HERE, "input.txt")], cfg.data_dir,
                           prefix="shakespeare", shard_size=2 ** 15, workers=1,
                           overwrite=True)
        if barrier is not None:
            barrier()
    if not os.path.isdir(cfg.data_dir) or not list_shards(cfg.data_dir, "train"):
        raise UserError(f"no training shards in {cfg.data_dir}/: run `python fineweb.py` to "
                        "make them (FineWeb-Edu, 10B tokens), or try "
                        "`python train_gpt2.py --preset shakespeare`")
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
    parser.add_argument("--shard-size", type=int, default=10**8,
                        help="tokens per shard (default: %(default)s)")
    parser.add_argument("--workers", type=int, help="tokenizer processes (default: one per core; "
                        "1 for local inputs under 8 MB, where a pool costs more than it saves)")
    parser.add_argument("--streaming", action="store_true", help="read the data while it "
                        "downloads instead of into the Hugging Face cache first")
    parser.add_argument("--overwrite", action="store_true", help="replace the shards that "
                        "another input or --shard-size left under the same --out-dir and "
                        "--prefix (without it they are kept, and the run refused)")
    args = parser.parse_args(argv)
    if not 0 < args.shard_size < 2**31:
        parser.error("--shard-size must be between 1 and 2**31 - 1 (the header holds an int32)")
    if args.workers is not None and args.workers < 1:
        parser.error("--workers must be at least 1")
    try:
        if args.input:
            prefix = args.prefix or "local"
            tokenize_local(args.input, args.out_dir or os.path.join("data", prefix), prefix=prefix,
                           shard_size=args.shard_size, workers=args.workers,
                           streaming=args.streaming, overwrite=args.overwrite)
        else:
            tokenize_fineweb(args.out_dir or "edu_fineweb10B", name=args.name,
                             prefix=args.prefix or "edufineweb", shard_size=args.shard_size,
                             workers=args.workers, streaming=args.streaming,
                             overwrite=args.overwrite)
    except OSError as e:  # an unwritable --out-dir, a full disk
        raise UserError(f"{e.filename or args.out_dir}: {e.strerror or e}") from None
    except KeyboardInterrupt:
        raise UserError("interrupted: run the same command again to resume from the last "
                        "complete shard") from None


if __name__ == "__main__":
    sys.exit(run_cli(main))

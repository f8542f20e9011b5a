"""
Tests for fineweb.py: shards round-trip, cut at the right places, read llm.c's format and
build-nanogpt's .npy, survive SIGKILL and Ctrl-C, cache, resume from a missing shard, never
replace another run's shards by mistake, give any corpus big enough a val and a train split
(and train_gpt2.py the command that makes a missing one), and fail on bad input or an out of
range flag with one clear line, leaving nothing behind.

    python -m pytest -q tests/test_fineweb.py
"""

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import common
import fineweb
import train_gpt2
from conftest import ROOT, TINY, llmc_read, llmc_write, read_log, run, start, write_jsonl
from fineweb import MAGIC, VERSION, HEADER_INTS, ShardError
from tokenizer import EOT, get_encoding

ROOT = Path(ROOT)


# -----------------------------------------------------------------------------
# helpers

def make_docs(n, seed=0, size=(200, 3000)):
    """n documents of Shakespeare paragraphs, plus the awkward cases a tokenizer meets."""
    text = (ROOT / "input.txt").read_text(encoding="utf-8")
    paragraphs = [p for p in text.split("\n\n") if p.strip()]
    rng = random.Random(seed)
    docs = []
    for _ in range(n):
        goal, doc = rng.randint(*size), []
        while sum(map(len, doc)) < goal:
            doc.append(rng.choice(paragraphs))
        docs.append("\n\n".join(doc))
    odd = ["", " ", "café naïve 日本語 🤖", "a <|endoftext|> in it", "\n\n\n  trailing  "]
    return odd + docs if n >= 10 else docs


def expected_stream(docs):
    enc = get_encoding()
    return np.array([t for d in docs for t in [EOT] + enc.encode_ordinary(d)], dtype=np.uint16)


def concat(paths):
    return np.concatenate([fineweb.load_shard(p) for p in paths] or [np.zeros(0, np.uint16)])


def write_parquet(path, docs):
    pq.write_table(pa.table({"text": docs, "id": list(range(len(docs)))}), path)


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    """Keeps datasets' cache of our test files out of the home directory."""
    import datasets
    cache = str(tmp_path / "hf_cache")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    monkeypatch.setenv("HF_DATASETS_CACHE", cache)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def run_fineweb(*args, **kwargs):
    return start(["fineweb.py", *args], **kwargs)


# -----------------------------------------------------------------------------
# tokenizing

def test_encode_documents_is_eot_then_encode_ordinary():
    enc = get_encoding()
    texts = make_docs(3) + ["", "<|endoftext|>", "x<|endoftext|>y", "lone \ud800 surrogate",
                            "tabs\t\tand   spaces \n\n", "数字 123456789 ١٢٣", "😀" * 50]
    want = [t for text in texts for t in [EOT] + enc.encode_ordinary(text)]
    got = fineweb.encode_documents(texts)
    assert got.dtype == np.uint16
    assert got.tolist() == want


@pytest.mark.parametrize("kind", ["txt", "jsonl", "parquet"])
def test_round_trip(tmp_path, hf_cache, kind):
    docs = make_docs(40, seed=1)
    if kind == "txt":  # one document per file
        paths = [tmp_path / f"doc{i:02d}.txt" for i in range(len(docs))]
        for p, d in zip(paths, docs):
            p.write_bytes(d.encode())
    else:
        paths = [tmp_path / f"docs.{kind}"]
        (write_jsonl if kind == "jsonl" else write_parquet)(paths[0], docs)
    shards = fineweb.tokenize_local(paths, tmp_path / "out", shard_size=5000, workers=1)
    assert np.array_equal(concat(shards), expected_stream(docs))


def test_mixed_inputs_in_order_with_a_pool(tmp_path, hf_cache):
    docs = make_docs(60, seed=2)
    (tmp_path / "a.txt").write_text(docs[0], encoding="utf-8")
    write_jsonl(tmp_path / "b.jsonl", docs[1:30])
    write_parquet(tmp_path / "c.parquet", docs[30:-1])
    (tmp_path / "d.txt").write_text(docs[-1], encoding="utf-8")
    paths = [tmp_path / n for n in ["a.txt", "b.jsonl", "c.parquet", "d.txt"]]
    shards = fineweb.tokenize_local(paths, tmp_path / "out", prefix="mix", shard_size=3000,
                                    workers=2)
    assert np.array_equal(concat(shards), expected_stream(docs))


def test_fineweb_from_the_hub_with_a_stand_in_dataset(tmp_path, hf_cache, monkeypatch):
    # no network here: check what we ask the hub for, and that the rest is the local path
    import datasets
    docs = make_docs(30, seed=8)
    local = datasets.Dataset.from_dict({"text": docs, "score": [3.0] * len(docs)})
    calls = []

    def load_dataset(path, name=None, *, split, streaming):
        calls.append((path, name, split, streaming))
        return local.to_iterable_dataset() if streaming else local

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    for streaming in [False, True]:
        shards = fineweb.tokenize_fineweb(tmp_path / str(streaming), shard_size=5000, workers=1,
                                          streaming=streaming)
        assert os.path.basename(shards[0]) == "edufineweb_val_000000.bin"
        assert np.array_equal(concat(shards), expected_stream(docs))
    assert calls == [("HuggingFaceFW/fineweb-edu", "sample-10BT", "train", False),
                     ("HuggingFaceFW/fineweb-edu", "sample-10BT", "train", True)]


# -----------------------------------------------------------------------------
# shards

def test_shard_boundaries(tmp_path):
    docs = make_docs(30, seed=4)
    stream = expected_stream(docs)
    paths = []
    for i, d in enumerate(docs):
        (tmp_path / f"d{i}.txt").write_text(d, encoding="utf-8")
        paths.append(tmp_path / f"d{i}.txt")
    # the val split as large as a training shard (build-nanogpt's layout), larger, smaller,
    # and by default a tenth of the corpus
    for shard_size, val in [(1000, 1000), (777, 1500), (1200, 600), (1000, None)]:
        out = tmp_path / f"out{shard_size}_{val}"
        shards = fineweb.tokenize_local(paths, out, prefix="b", shard_size=shard_size,
                                        val_split_tokens=val, workers=1)
        names = [os.path.basename(s) for s in shards]
        assert names == ["b_val_000000.bin"] + [f"b_train_{i:06d}.bin"
                                                for i in range(1, len(shards))]
        assert fineweb.list_shards(out, "val") == [str(out / names[0])]
        assert fineweb.list_shards(out, "train") == [str(out / n) for n in names[1:]]
        sizes = [len(fineweb.load_shard(s)) for s in shards]
        assert sizes[0] == (val or len(stream) // 10)
        assert sizes[1:-1] == [shard_size] * (len(shards) - 2) and 0 < sizes[-1] <= shard_size
        assert np.array_equal(concat(shards), stream)


def test_a_text_of_a_megabyte_gets_both_splits_without_flags(tmp_path):
    shards = fineweb.tokenize_local([ROOT / "input.txt"], tmp_path / "out")
    stream = expected_stream([(ROOT / "input.txt").read_text(encoding="utf-8")])
    assert [os.path.basename(p) for p in shards] == ["local_val_000000.bin",
                                                     "local_train_000001.bin"]
    assert len(fineweb.load_shard(shards[0])) == len(stream) // 10  # a tenth is val
    assert np.array_equal(concat(shards), stream)
    fineweb.check_splits(tmp_path / "out")  # what train_gpt2.py asks: both splits are there


def test_the_val_split_of_a_large_corpus_stops_at_its_cap(tmp_path, monkeypatch):
    # as a corpus of more than 100M tokens would, at a scale a test can afford: the run
    # reads ahead until the val split is sure to be the cap, then streams the rest
    monkeypatch.setattr(fineweb, "VAL_SPLIT_MAX", 1000)
    docs = make_docs(60, seed=11)
    paths = []
    for i, doc in enumerate(docs):
        paths.append(tmp_path / f"d{i}.txt")
        paths[-1].write_text(doc, encoding="utf-8")
    stream = expected_stream(docs)
    assert len(stream) > 10 * 1000 + 3 * 3000
    shards = fineweb.tokenize_local(paths, tmp_path / "out", shard_size=3000)
    sizes = [len(fineweb.load_shard(p)) for p in shards]
    assert sizes[0] == 1000 and set(sizes[1:-1]) == {3000} and 0 < sizes[-1] <= 3000
    assert np.array_equal(concat(shards), stream)


def test_your_own_text_in_two_commands_trains(tmp_path):
    # the README's local-corpus example, with no size flags, then a tiny GPT on GPT-2's
    # vocabulary: the val loss falls
    data, log_dir = str(tmp_path / "data"), str(tmp_path / "log")
    run(["fineweb.py", "--input", "input.txt", "--out-dir", data])
    assert common.run_cli(train_gpt2.main, [
        *TINY, "--vocab-size", "50304", "--total-batch-size", "128", "--max-lr", "1e-2",
        "--eval-every", "6", "--max-steps", "12", "--data-dir", data, "--log-dir", log_dir]) == 0
    val = [v for _, stream, v in read_log(log_dir) if stream == "val"]
    assert len(val) == 3 and val[-1] < val[0] - 0.5


def test_pack_shards_exact_multiple_and_skip():
    chunks = [(0, np.arange(10, dtype=np.uint16)), (3, np.arange(10, 20, dtype=np.uint16))]
    got = [(s.copy(), r) for s, r in fineweb.pack_shards(iter(chunks), 5)]
    assert [s.tolist() for s, _ in got] == [list(range(i, i + 5)) for i in range(0, 20, 5)]
    assert [r for _, r in got] == [(0, 5), (0, 10), (3, 5), (3, 10)]  # no empty last shard
    # resuming at (0, 7): the stream from document 0, less the 7 tokens already written
    got = [s.tolist() for s, _ in fineweb.pack_shards(iter(chunks), 5, skip=7)]
    assert got == [[7, 8, 9, 10, 11], [12, 13, 14, 15, 16], [17, 18, 19]]


def test_write_and_load_shard(tmp_path):
    tokens = np.array([EOT, 0, 1, 65535, 31373], dtype=np.uint16)
    path = tmp_path / "x_val_000000.bin"
    fineweb.write_shard(path, tokens)
    loaded = fineweb.load_shard(path)
    assert isinstance(loaded, np.memmap) and loaded.dtype == np.uint16
    assert not loaded.flags.writeable
    assert loaded.tolist() == tokens.tolist()
    assert os.listdir(tmp_path) == [path.name]  # the temp file became the shard
    fineweb.write_shard(str(path), tokens[:0])
    assert len(fineweb.load_shard(path)) == 0
    with pytest.raises(TypeError):
        fineweb.write_shard(str(path), tokens.astype(np.int64))


def test_llmc_reads_ours_and_we_read_llmcs(tmp_path):
    tokens = expected_stream(make_docs(2, seed=5))
    ours, theirs = tmp_path / "ours.bin", tmp_path / "theirs.bin"
    fineweb.write_shard(str(ours), tokens)
    llmc_write(theirs, tokens)
    assert np.array_equal(llmc_read(ours), tokens)
    assert np.array_equal(fineweb.load_shard(theirs), tokens)
    assert ours.read_bytes() == theirs.read_bytes()


def test_npy_shards(tmp_path):
    tokens = np.arange(1000, dtype=np.uint16)
    np.save(tmp_path / "edufineweb_train_000001.npy", tokens)
    loaded = fineweb.load_shard(tmp_path / "edufineweb_train_000001.npy")
    assert loaded.dtype == np.uint16 and isinstance(loaded, np.memmap)
    assert np.array_equal(loaded, tokens)
    np.save(tmp_path / "wide.npy", tokens.astype(np.int32))
    with pytest.raises(ShardError, match=r"wide\.npy.*uint16"):
        fineweb.load_shard(tmp_path / "wide.npy")


def test_bad_shards_name_the_file(tmp_path):
    good = tmp_path / "good.bin"
    fineweb.write_shard(str(good), np.arange(100, dtype=np.uint16))
    data = good.read_bytes()

    def corrupt(name, new_bytes):
        path = tmp_path / name
        path.write_bytes(new_bytes)
        return path

    header = np.frombuffer(data[:1024], dtype=np.int32).copy()
    header[0] = 20240519
    with pytest.raises(ShardError, match=r"magic\.bin: wrong magic 20240519, expected 20240520"):
        fineweb.load_shard(corrupt("magic.bin", header.tobytes() + data[1024:]))
    header[0], header[1] = MAGIC, 7
    with pytest.raises(ShardError, match=r"version\.bin: version 7, expected 1"):
        fineweb.load_shard(corrupt("version.bin", header.tobytes() + data[1024:]))
    with pytest.raises(ShardError, match=r"truncated\.bin: .*truncated"):
        fineweb.load_shard(corrupt("truncated.bin", data[:-2]))
    with pytest.raises(ShardError, match=r"short\.bin: .*header"):
        fineweb.load_shard(corrupt("short.bin", data[:100]))
    with pytest.raises(ShardError, match=r"gone\.bin"):
        fineweb.load_shard(tmp_path / "gone.bin")
    with pytest.raises(ShardError, match=r"x\.txt"):
        fineweb.load_shard(corrupt("x.txt", b"hello"))


def test_list_shards(tmp_path):
    assert fineweb.list_shards(tmp_path / "nowhere", "train") == []
    for name in ["a_train_000002.bin", "a_train_000001.npy", "a_val_000000.bin",
                 "a_train_000003.bin.tmp", ".a_train_000004.bin.123.tmp", "a_manifest.json",
                 "notes_train_.txt", "a_train_01.bin", "a_val_000000.bin.bak"]:
        (tmp_path / name).write_bytes(b"")
    assert fineweb.list_shards(tmp_path, "train") == [
        str(tmp_path / "a_train_000001.npy"), str(tmp_path / "a_train_000002.bin")]
    assert fineweb.list_shards(str(tmp_path), "val") == [os.path.join(tmp_path, "a_val_000000.bin")]


def test_the_split_is_the_part_before_the_number(tmp_path):
    # shards made elsewhere with a prefix that holds a split's name: each lands in its own split
    for name in ["my_train_set_val_000000.bin", "my_train_set_train_000001.bin",
                 "val_data_train_000002.npy"]:
        (tmp_path / name).write_bytes(b"")
    assert fineweb.list_shards(tmp_path, "val") == [str(tmp_path / "my_train_set_val_000000.bin")]
    train = ["my_train_set_train_000001.bin", "val_data_train_000002.npy"]
    assert fineweb.list_shards(tmp_path, "train") == [str(tmp_path / name) for name in train]


@pytest.mark.parametrize("prefix", ["my_train_set", "x_val", "", "a/b"])
def test_a_prefix_that_would_mislead_readers_is_refused(tmp_path, prefix):
    (tmp_path / "a.txt").write_text("hello")
    with pytest.raises(fineweb.InputError, match="prefix"):
        fineweb.tokenize_local([tmp_path / "a.txt"], tmp_path / "out", prefix=prefix)
    assert not (tmp_path / "out").exists()


def test_load_shard_maps_a_large_shard_without_reading_it(tmp_path):
    path = tmp_path / "big_train_000001.bin"
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[:3] = MAGIC, VERSION, 100_000_000
    with open(path, "wb") as f:
        f.write(header.tobytes())
        f.truncate(4 * HEADER_INTS + 2 * 100_000_000)  # sparse: 200 MB that take no disk
    code = f"""
import resource, sys
import numpy as np
sys.path.insert(0, {str(ROOT)!r})
import fineweb
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
tokens = fineweb.load_shard({str(path)!r})
assert isinstance(tokens, np.memmap) and tokens.dtype == np.uint16 and len(tokens) == 10**8
windows = [np.array(tokens[i:i + 1025], dtype=np.int64) for i in range(0, 10**8, 10**7)]
assert len(windows) == 10 and all(len(w) == 1025 for w in windows)
grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
print(grown // 1024 if sys.platform == "darwin" else grown)  # KiB
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert int(result.stdout) < 100 * 1024, f"peak RSS grew by {result.stdout.strip()} KiB"


# -----------------------------------------------------------------------------
# a run: cache, kill and resume, bad input

def file_ids(paths):
    """What rewriting a file changes: its inode (atomic_write renames a new file over it)
    and its modification time."""
    return [(os.stat(p).st_ino, os.stat(p).st_mtime_ns) for p in paths]


def read_manifest(out, prefix):
    return json.loads((Path(out) / f"{prefix}_manifest.json").read_text())


def test_second_call_changes_nothing(tmp_path, hf_cache, monkeypatch, capsys):
    data, out = tmp_path / "docs.jsonl", tmp_path / "out"
    write_jsonl(data, make_docs(50, seed=6))
    first = fineweb.tokenize_local([data], out, prefix="c", shard_size=4000)
    before = file_ids(first + [out / "c_manifest.json"])
    capsys.readouterr()

    def no_tokenizing(texts):
        raise AssertionError("tokenized again although the input did not change")

    monkeypatch.setattr(fineweb, "encode_documents", no_tokenizing)
    assert fineweb.tokenize_local([data], out, prefix="c", shard_size=4000) == first
    assert capsys.readouterr().out == f"c: {len(first)} shards in {out} are up to date\n"
    assert file_ids(first + [out / "c_manifest.json"]) == before
    assert sorted(os.listdir(out)) == sorted([os.path.basename(p) for p in first] +
                                             ["c_manifest.json"])
    # a run killed while it rewrote the finished manifest left its temp file: the next
    # call finds the shards up to date and removes that file, touching nothing else
    (out / ".c_manifest.json.99999.tmp").write_text("{")
    assert fineweb.tokenize_local([data], out, prefix="c", shard_size=4000) == first
    assert not (out / ".c_manifest.json.99999.tmp").exists()
    assert file_ids(first + [out / "c_manifest.json"]) == before


def test_shards_of_another_input_are_kept_unless_overwrite(tmp_path, hf_cache):
    data, out = tmp_path / "docs.jsonl", tmp_path / "out"
    docs = make_docs(50, seed=6)
    write_jsonl(data, docs)
    first = fineweb.tokenize_local([data], out, prefix="c", shard_size=4000)
    kept = {p: Path(p).read_bytes() for p in first + [str(out / "c_manifest.json")]}
    other = tmp_path / "other.txt"
    other.write_text("".join(docs[5:30]))
    write_jsonl(data, docs[:20])  # the same file, now other documents
    for paths, shard_size in [([data], 4000), ([other], 4000), ([data], 3000)]:
        with pytest.raises(fineweb.InputError, match=r"--out-dir or --prefix.*--overwrite"):
            fineweb.tokenize_local(paths, out, prefix="c", shard_size=shard_size)
        assert {p: Path(p).read_bytes() for p in kept} == kept
    # another prefix in the same directory keeps both
    mine = fineweb.tokenize_local([other], out, prefix="mine", shard_size=4000)
    assert {p: Path(p).read_bytes() for p in kept} == kept
    assert np.array_equal(concat(mine), expected_stream(["".join(docs[5:30])]))

    second = fineweb.tokenize_local([data], out, prefix="c", shard_size=4000, overwrite=True)
    assert len(second) < len(first)  # fewer documents: fewer shards, and the others are gone
    assert np.array_equal(concat(second), expected_stream(docs[:20]))
    assert sorted(fineweb.list_shards(out, "val") + fineweb.list_shards(out, "train")) == \
        sorted(second + mine)


def test_shards_without_a_manifest_are_kept_unless_overwrite(tmp_path):
    # llm.c's fineweb.py names its shards like ours and writes no manifest
    out = tmp_path / "edu"
    out.mkdir()
    fineweb.write_shard(out / "edufineweb_train_000001.bin", np.arange(10, dtype=np.uint16))
    text = make_docs(1, size=(40000, 40000))[0]
    (tmp_path / "a.txt").write_text(text)
    with pytest.raises(fineweb.InputError, match=r"1 edufineweb shards have no edufineweb_mani"):
        fineweb.tokenize_local([tmp_path / "a.txt"], out, prefix="edufineweb")
    assert os.listdir(out) == ["edufineweb_train_000001.bin"]
    shards = fineweb.tokenize_local([tmp_path / "a.txt"], out, prefix="edufineweb", overwrite=True)
    assert sorted(os.listdir(out)) == ["edufineweb_manifest.json", "edufineweb_train_000001.bin",
                                       "edufineweb_val_000000.bin"]
    assert np.array_equal(concat(shards), expected_stream([text]))


@pytest.mark.parametrize("streaming", [False, True])
def test_a_missing_or_damaged_shard_is_made_again_from_where_it_starts(tmp_path, hf_cache,
                                                                       capsys, streaming):
    # A shard starts at a task of DOCS_PER_TASK documents, less the tokens an earlier shard
    # holds: here at document 0, 256 (inside a.jsonl) or 512 (past b.txt, inside c.jsonl).
    docs = make_docs(700, seed=3, size=(10, 50))
    write_jsonl(tmp_path / "a.jsonl", docs[:400])
    (tmp_path / "b.txt").write_text(docs[400], encoding="utf-8")
    write_jsonl(tmp_path / "c.jsonl", docs[401:])
    paths = [tmp_path / n for n in ["a.jsonl", "b.txt", "c.jsonl"]]
    out = tmp_path / "out"
    shards = fineweb.tokenize_local(paths, out, prefix="s", shard_size=2000, streaming=streaming)
    reference = [Path(p).read_bytes() for p in shards]
    starts = [record["start"] for record in read_manifest(out, "s")["shards"].values()]
    assert starts[0] == [0, 0] and len(starts) == len(shards)
    assert fineweb.DOCS_PER_TASK == 256 and {d for d, _ in starts} == {0, 256, 512}
    first_at = [next(k for k, (d, _) in enumerate(starts) if d == doc) for doc in [256, 512]]
    for i, k in enumerate([1] + first_at + [len(shards) - 1]):
        if i % 2:
            os.remove(shards[k])
        else:  # damaged: cut short
            Path(shards[k]).write_bytes(reference[k][:-2])
        kept = file_ids(shards[:k])
        capsys.readouterr()
        assert fineweb.tokenize_local(paths, out, prefix="s", shard_size=2000,
                                      streaming=streaming) == shards
        said = capsys.readouterr().out
        assert f"s_{'val' if k == 0 else 'train'}_{k:06d}.bin is missing or damaged; " \
            f"tokenizing again from it on, keeping the {k} shard(s) before it" in said
        assert file_ids(shards[:k]) == kept
        assert [Path(p).read_bytes() for p in shards] == reference
    assert np.array_equal(concat(shards), expected_stream(docs))


def test_check_splits_names_the_command_that_makes_the_missing_split(tmp_path):
    def refusal(data_dir):
        with pytest.raises(fineweb.InputError) as error:
            fineweb.check_splits(data_dir)
        return str(error.value)

    said = refusal(tmp_path / "edu_fineweb10B")  # a fresh clone's plain train_gpt2.py
    assert "`python fineweb.py` to make them (FineWeb-Edu, 10B tokens" in said
    assert "--preset shakespeare" in said
    said = refusal(tmp_path / "mine")  # anywhere else: no FineWeb-Edu, your own text
    assert said == f"no shards in {tmp_path}/mine/: make them from your own text with " \
        f"`python fineweb.py --input FILE... --out-dir {tmp_path}/mine`"

    out = tmp_path / "out"
    text = tmp_path / "my text.txt"
    text.write_text(make_docs(1, size=(40000, 40000))[0])
    shards = fineweb.tokenize_local([text], out, shard_size=1000)
    fineweb.check_splits(out)
    command = f"python fineweb.py --input '{text}' --out-dir {out} --shard-size 1000"
    # a training shard gone: the same command makes it again
    os.remove(shards[-1])
    os.remove(shards[-2])
    fineweb.check_splits(out)  # some train shards are still there
    for path in shards[1:-2]:
        os.remove(path)
    said = refusal(out)
    assert said.startswith(f"{out}/ holds local: 1 val and 0 train shard(s)")
    assert said.endswith(f"run it again: `{command}`")
    # an older fineweb.py's layout: everything in shard 0, the manifest says it is finished
    manifest = read_manifest(out, "local")
    del manifest["key"]["val_split_tokens"]
    manifest["shards"] = {"local_val_000000.bin": manifest["shards"]["local_val_000000.bin"]}
    manifest["done"], manifest["resume"] = True, None
    (out / "local_manifest.json").write_text(json.dumps(manifest))
    assert refusal(out).endswith("make both splits with `python fineweb.py --input "
                                 f"'{text}' --out-dir {out} --overwrite`")
    # no manifest: shards made elsewhere, or copied without their train split
    os.remove(out / "local_manifest.json")
    os.rename(shards[0], out / "theirs_val_000000.bin")
    fineweb.write_shard(out / "mine_train_000001.bin", np.arange(600, dtype=np.uint16))
    said = refusal(out)
    assert said.startswith(f"{out}/ holds mine: 0 val and 1 train shard(s), theirs: 1 val and "
                           "0 train shard(s), and a run needs a val and a train split of each "
                           "prefix: make both splits with `python fineweb.py --input FILE... "
                           f"--out-dir {out} --prefix mine`")


def test_train_gpt2_on_a_val_split_alone_says_which_command_fixes_it(tmp_path, capsys):
    out = tmp_path / "out"
    text = tmp_path / "a.txt"
    text.write_text(make_docs(1, size=(40000, 40000))[0])
    fineweb.tokenize_local([text], out)
    os.remove(out / "local_train_000001.bin")
    capsys.readouterr()
    assert common.run_cli(train_gpt2.main, TINY + ["--data-dir", str(out), "--log-dir",
                                                   str(tmp_path / "log")]) == 1
    err = capsys.readouterr().err
    assert err == f"error: {out}/ holds local: 1 val and 0 train shard(s), and a run needs a " \
        "val and a train split of each prefix: its fineweb.py run did not finish, or a shard " \
        f"it wrote is gone; run it again: `python fineweb.py --input {text} --out-dir {out}`\n"
    assert "10B" not in err


def test_the_manifest_records_each_shards_largest_token_id(tmp_path):
    docs = ["a" * 3000 + " word" * 2000, "short", " the" * 1500]  # shards without an EOT
    for i, d in enumerate(docs):
        (tmp_path / f"d{i}.txt").write_text(d)
    out = tmp_path / "out"
    assert fineweb.largest_token_id(out) is None
    shards = fineweb.tokenize_local([tmp_path / f"d{i}.txt" for i in range(3)], out, prefix="m",
                                    shard_size=1000, val_split_tokens=600)
    records = read_manifest(out, "m")["shards"]
    largest = [int(fineweb.load_shard(p).max()) for p in shards]
    assert [records[os.path.basename(p)]["largest_id"] for p in shards] == largest
    assert min(largest) < EOT  # some shard holds no document start
    assert fineweb.largest_token_id(out) == max(largest) == EOT
    fineweb.tokenize_local([tmp_path / "d2.txt"], out, prefix="n", shard_size=1000,  # a second
                           val_split_tokens=600)
    assert fineweb.largest_token_id(str(out)) == EOT
    # a shard that no manifest describes could hold anything
    fineweb.write_shard(out / "foreign_train_000001.bin", np.array([7], dtype=np.uint16))
    assert fineweb.largest_token_id(out) is None


def test_killed_at_any_moment_resumes_to_identical_shards(tmp_path, hf_cache):
    data = tmp_path / "docs.jsonl"
    write_jsonl(data, make_docs(600, seed=7, size=(1000, 10000)))  # ~1.2M tokens
    # val as large as a shard: shards are written as the run goes (a default val split of a
    # small corpus waits for all of it)
    args = ["--input", data, "--shard-size", 60_000, "--val-split-tokens", 60_000, "--workers", 2]
    reference = fineweb.tokenize_local([data], tmp_path / "ref", shard_size=60_000,
                                       val_split_tokens=60_000, workers=2)
    ref_shards = {os.path.basename(p): Path(p).read_bytes() for p in reference}
    assert len(ref_shards) >= 15

    out = tmp_path / "killed"
    seen = {}  # shard name -> mtime when we last checked it

    def new_shards():
        """Checks every shard that appeared or changed since the last call: a file under
        a final shard name must always be complete and equal to the uninterrupted run's."""
        changed = 0
        for name in os.listdir(out) if out.exists() else []:
            try:
                mtime = (out / name).stat().st_mtime_ns
                if name.endswith(".bin") and seen.get(name) != mtime:
                    assert (out / name).read_bytes() == ref_shards[name], name
                    seen[name], changed = mtime, changed + 1
            except FileNotFoundError:  # removed by a fresh start, or renamed over: fine
                pass
        return changed

    def run_and_kill(kill_after_seconds=None, kill_after_shards=None):
        new_shards()
        proc = run_fineweb(*args, "--out-dir", out, start_new_session=True)
        t0, written = time.time(), 0
        while proc.poll() is None:
            written += new_shards()
            if kill_after_seconds is not None and time.time() - t0 > kill_after_seconds or \
                    kill_after_shards is not None and written >= kill_after_shards:
                time.sleep(rng.uniform(0, 0.03))
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.003)
        proc.communicate()
        new_shards()
        for _ in range(1000):  # the pool's workers must not outlive the killed process
            try:
                os.killpg(proc.pid, 0)
                time.sleep(0.01)
            except ProcessLookupError:
                break
        else:
            raise AssertionError("worker processes survived their killed parent")

    rng = random.Random(int(os.environ.get("FINEWEB_TEST_SEED", "1234")))
    finished = {}  # shard -> mtime, for shards a manifest said were complete when we killed
    # a kill at a random time (likely in start-up), two soon after a random shard is written
    for kill in [dict(kill_after_seconds=rng.uniform(0.1, 1.5)),
                 dict(kill_after_shards=rng.randint(1, 6)),
                 dict(kill_after_shards=rng.randint(1, 6))]:
        run_and_kill(**kill)
        manifest = out / "local_manifest.json"
        for name in json.loads(manifest.read_text())["shards"] if manifest.exists() else []:
            finished.setdefault(name, (out / name).stat().st_mtime_ns)
    assert finished, "no kill came after a shard was complete"

    run_and_kill()  # to the end
    got = {os.path.basename(p): Path(p).read_bytes()
           for p in fineweb.list_shards(out, "val") + fineweb.list_shards(out, "train")}
    assert got.keys() == ref_shards.keys()
    assert got == ref_shards
    assert not [n for n in os.listdir(out) if n.endswith(".tmp")]
    # resuming kept what was finished: no shard a manifest recorded was written again
    assert {name: (out / name).stat().st_mtime_ns for name in finished} == finished

    rerun = run_fineweb(*args, "--out-dir", out)
    out_text, _ = rerun.communicate(timeout=60)
    assert rerun.returncode == 0 and "up to date" in out_text


@pytest.fixture(scope="module")
def slow_input(tmp_path_factory):
    """One .txt document that takes a tokenizer process seconds: a run that is still busy
    while the test looks at it."""
    path = tmp_path_factory.mktemp("slow") / "slow.txt"
    path.write_text((ROOT / "input.txt").read_text(encoding="utf-8") * 40, encoding="utf-8")
    return path


def holds_flock(pid, path):
    """Whether process pid holds a flock on path, as /proc/locks tells (Linux)."""
    inode = os.stat(path).st_ino
    for line in Path("/proc/locks").read_text().splitlines():
        fields = line.split()  # 1: FLOCK ADVISORY WRITE PID MAJOR:MINOR:INODE START END
        if fields[1] == "FLOCK" and fields[4] == str(pid) and \
                int(fields[5].rsplit(":", 1)[1]) == inode:
            return True
    return False


@pytest.mark.skipif(not os.path.exists("/proc/locks"), reason="reads /proc/locks")
def test_a_second_run_into_one_out_dir_is_refused(tmp_path, slow_input):
    out = tmp_path / "out"
    first = run_fineweb("--input", slow_input, "--out-dir", out, "--workers", 1,
                        start_new_session=True)
    try:
        deadline = time.time() + 60
        while not (out.exists() and holds_flock(first.pid, out)):
            assert first.poll() is None and time.time() < deadline, "the first run never started"
            time.sleep(0.01)
        (tmp_path / "other.txt").write_text("another input")
        others = [run_fineweb("--input", path, "--out-dir", out)
                  for path in [tmp_path / "other.txt", slow_input]]
        for proc in others:
            _, err = proc.communicate(timeout=60)
            assert proc.returncode == 1
            assert err == f"error: {out}/ is in use by another fineweb.py run; wait for it to " \
                "finish, or use another directory\n"
        # whatever is in out is the first run's: its manifest (once it has one) and shards
        assert all(name.startswith("local_") for name in os.listdir(out))
        if (out / "local_manifest.json").exists():
            manifest = json.loads((out / "local_manifest.json").read_text())
            assert [i["path"] for i in manifest["key"]["inputs"]] == [str(slow_input)]
    finally:
        first.kill()
        first.communicate()


def processes_in_group(pgid):
    """{pid: (state, ppid, cpu seconds)} of the live processes of a process group (Linux)."""
    found = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # ended meanwhile
            continue
        state, ppid, pgrp, utime, stime = fields[0], fields[1], fields[2], fields[11], fields[12]
        if int(pgrp) == pgid and state not in "ZX":  # a zombie has ended, just not been reaped
            cpu_seconds = (int(utime) + int(stime)) / os.sysconf("SC_CLK_TCK")
            found[int(pid)] = (state, int(ppid), cpu_seconds)
    return found


linux_only = pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="reads /proc")


@linux_only
@pytest.mark.parametrize("platform", ["linux", "other"])
def test_pool_workers_end_with_their_killed_parent(tmp_path, slow_input, platform):
    args = ["--input", str(slow_input), "--out-dir", str(tmp_path / "out"), "--workers", "2"]
    # elsewhere than Linux, the workers watch their parent instead of asking the kernel
    code = f"import sys, common, fineweb; sys.platform = {platform!r}; " \
        f"sys.exit(common.run_cli(fineweb.main, {args!r}))"
    parent = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.time() + 60
        while not [pid for pid, (_, ppid, cpu) in processes_in_group(parent.pid).items()
                   if ppid == parent.pid and cpu > 0.2]:  # a worker busy with the document
            assert parent.poll() is None and time.time() < deadline, "no worker got to work"
            time.sleep(0.01)
        parent.kill()
        parent.wait()  # not communicate(): that would wait for the workers, who share its pipes
        deadline = time.time() + 1
        while survivors := processes_in_group(parent.pid):
            assert time.time() < deadline, f"workers outlived their parent: {survivors}"
            time.sleep(0.01)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(parent.pid, signal.SIGKILL)
        parent.communicate()


@linux_only
def test_ctrl_c_with_workers_is_one_line_and_the_run_resumes(tmp_path):
    paths = []
    for i, doc in enumerate(make_docs(300, seed=9, size=(1000, 10000))):  # ~600k tokens
        paths.append(tmp_path / f"doc{i:03d}.txt")
        paths[-1].write_text(doc, encoding="utf-8")
    out = tmp_path / "out"
    args = ["--input", *paths, "--out-dir", out, "--shard-size", 20_000,
            "--val-split-tokens", 20_000, "--workers", 2]
    proc = run_fineweb(*args, start_new_session=True)
    deadline = time.time() + 60
    while not (out / "local_train_000002.bin").exists():
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.003)
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does: the whole group
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 1
    said = [line for line in err.replace("\r", "\n").splitlines()
            if line.strip() and not line.startswith("local: ")]  # less the progress bar
    assert said == ["error: interrupted: run the same command again to resume from the last "
                    "complete shard"]
    deadline = time.time() + 5
    while survivors := processes_in_group(proc.pid):
        assert time.time() < deadline, f"workers outlived the interrupted run: {survivors}"
        time.sleep(0.01)
    kept = sorted(json.loads((out / "local_manifest.json").read_text())["shards"])
    assert len(kept) >= 2  # shards 0 and 1 at least: 2 was on disk
    before = file_ids([out / name for name in kept])

    rerun = run_fineweb(*args)
    rerun.communicate(timeout=120)
    assert rerun.returncode == 0
    assert file_ids([out / name for name in kept]) == before  # resumed, not started over
    reference = fineweb.tokenize_local(paths, tmp_path / "ref", shard_size=20_000,
                                       val_split_tokens=20_000, workers=1)
    got = fineweb.list_shards(out, "val") + fineweb.list_shards(out, "train")
    assert [Path(p).read_bytes() for p in got] == [Path(p).read_bytes() for p in reference]


JSON_LINES = ['{"text": "one"}', '{"text": "two"}', '{"text": "three"}', '{"text": "four"}']


@pytest.mark.parametrize("streaming", [False, True])
@pytest.mark.parametrize("name, lines, want", [
    ("bad.jsonl", JSON_LINES[:2] + ['{"text": "no closing brace"'] + JSON_LINES[2:],
     "bad.jsonl: line 3 is not JSON (Expecting ',' delimiter, column 28)"),
    ("surrogate.jsonl", JSON_LINES[:3] + ['{"text": "half a pair: \\ud800 "}'],
     "surrogate.jsonl: line 4 holds a lone surrogate"),
    ("empty.jsonl", [], "empty.jsonl: empty, no records"),
    ("blank.jsonl", ["", "  "], "blank.jsonl: empty, no records"),
], ids=["bad line", "surrogate", "empty", "blank"])
def test_a_bad_json_file_names_the_line(tmp_path, hf_cache, streaming, name, lines, want):
    (tmp_path / name).write_text("".join(line + "\n" for line in lines))
    with pytest.raises(fineweb.InputError) as error:
        fineweb.tokenize_local([tmp_path / name], tmp_path / "out", streaming=streaming)
    assert str(error.value).startswith(f"{tmp_path / want}")


def _bad_runs(tmp_path):
    """[(fineweb.py arguments, words the one error line must hold)]"""
    (tmp_path / "notext.jsonl").write_text('{"text": "fine"}\n{"title": "no text here"}\n')
    (tmp_path / "corrupt.parquet").write_bytes(b"PAR1" + os.urandom(200))
    (tmp_path / "data.csv").write_text("text\nhello\n")
    (tmp_path / "fine.txt").write_text("hello")
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "latin1.txt").write_bytes("café crème".encode("latin-1"))
    cases = {"missing.txt": ["no such file"], "notext.jsonl": ["record 2 has no 'text'"],
             "corrupt.parquet": ["cannot load it"], "data.csv": ["unknown extension"],
             "latin1.txt": ["not UTF-8"],
             "fine.txt": ["2 tokens, too few to train on", "at least 5,130", "give more text"],
             "empty.txt": ["1 token, too few to train on", "at least 5,130"]}
    runs = [(["--input", tmp_path / name], [name, *want]) for name, want in cases.items()]
    runs.append((["--input", tmp_path / "fine.txt", "--prefix", "my_train_set"],
                 ["my_train_set", "_train_"]))
    runs.append((["--input", ROOT / "input.txt", "--val-split-tokens", 400_000],
                 ["input.txt: 327,754 tokens", "at least 400,513", "smaller --val-split-tokens"]))
    return runs


def test_bad_input_is_one_line_without_traceback(tmp_path, hf_cache):
    runs = _bad_runs(tmp_path)
    # one --out-dir each: running at once, they would be refused for sharing one
    procs = [run_fineweb(*args, "--out-dir", tmp_path / f"out{i}")
             for i, (args, _) in enumerate(runs)]
    for proc, (args, words) in zip(procs, runs):
        _, err = proc.communicate(timeout=60)
        assert proc.returncode != 0, args
        assert "Traceback" not in err
        # less the progress bar, which a slow machine shows before the corpus is found short
        lines = [line for line in err.splitlines() if line.strip() and
                 not line.startswith("local: ")]
        assert len(lines) == 1, err
        assert lines[0].startswith("error: "), lines[0]
        assert all(word in lines[0] for word in words), (words, lines[0])
    # and left nothing that the next run would find: not even an empty --out-dir
    assert not [i for i in range(len(runs)) if (tmp_path / f"out{i}").exists()]


def test_a_failed_run_leaves_an_existing_out_dir_as_it_was(tmp_path, hf_cache):
    out = tmp_path / "out"
    theirs = fineweb.tokenize_local([ROOT / "input.txt"], out, prefix="theirs")
    (tmp_path / "notext.jsonl").write_text('{"title": "no text here"}\n')
    (tmp_path / "latin1.txt").write_bytes("café crème".encode("latin-1"))
    (tmp_path / "small.txt").write_text("too little text")
    before = {name: (out / name).read_bytes() for name in os.listdir(out)}
    for name in ["notext.jsonl", "latin1.txt", "small.txt"]:
        with pytest.raises(fineweb.InputError, match=name):
            fineweb.tokenize_local([tmp_path / name], out)
        assert {name: (out / name).read_bytes() for name in os.listdir(out)} == before
    # the next run of the same prefix starts as if none of them had happened
    (tmp_path / "small.txt").write_text(make_docs(1, size=(40000, 40000))[0])
    mine = fineweb.tokenize_local([tmp_path / "small.txt"], out)
    assert [os.path.basename(p) for p in mine] == ["local_val_000000.bin", "local_train_000001.bin"]
    assert sorted(os.listdir(out)) == sorted([*before, "local_manifest.json",
                                              *map(os.path.basename, mine)])
    assert {name: (out / name).read_bytes() for name in before} == before
    assert fineweb.tokenize_local([ROOT / "input.txt"], out, prefix="theirs") == theirs


@pytest.mark.parametrize("args, words", [
    (["--shard-size", "0"], ["--shard-size 0 is out of range", "1 to 2147483647",
                             "default 100000000"]),
    (["--shard-size", str(2**31)], ["--shard-size 2147483648", "1 to 2147483647"]),
    (["--val-split-tokens", "512"], ["--val-split-tokens 512", "513 to", "a tenth"]),
    (["--workers", "0"], ["--workers 0", "1 to 1024", "default one per core"]),
    (["--workers", "-2"], ["--workers -2", "1 to 1024"]),
    (["--shard-size", "nan"], ["--shard-size", "'nan'"]),
    (["--val-split-tokens", "inf"], ["--val-split-tokens", "'inf'"]),
    (["--workers", "1.5"], ["--workers", "'1.5'"]),
])
def test_a_numeric_flag_out_of_range_is_one_line(tmp_path, capsys, args, words):
    argv = ["--input", str(ROOT / "input.txt"), "--out-dir", str(tmp_path / "out"), *args]
    try:
        status = common.run_cli(fineweb.main, argv)
    except SystemExit as e:  # argparse's own: not an int at all
        status = e.code
    assert status not in (0, None)
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and all(word in lines[0] for word in words), (words, lines)
    assert not (tmp_path / "out").exists()

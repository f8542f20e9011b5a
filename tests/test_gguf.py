"""--export-gguf: the file llama.cpp's converter would write for GPT-2, read back with the
gguf package's reader; and, where llama-cpp-python is installed, loaded by llama.cpp itself,
whose tokens and logits must be ours."""
import os
import sys

import numpy as np
import pytest
import torch

import checkpoint
import train_gpt2
from common import UserError
from conftest import run
from gguf_export import export_gguf
from tokenizer import GPT2_VOCAB, get_encoding

TEXTS = ["Hello, I'm a language model,", "The quick brown fox jumps over 13 lazy dogs.",
         " leading space, tabs\tand\nnewlines; ünïcödé and emoji 🙂!",
         "<|endoftext|> is text here"]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return train_gpt2.GPT(train_gpt2.GPTConfig(block_size=64, vocab_size=50304, n_layer=2,
                                               n_head=2, n_embd=64)).eval()


def fields(reader):
    return {name: field.contents() for name, field in reader.fields.items()}


@pytest.mark.parametrize("weight_type", ["f32", "f16"])
def test_the_file_is_llama_cpps_gpt2(model, tmp_path, weight_type):
    gguf = pytest.importorskip("gguf")
    path = str(tmp_path / "model.gguf")
    size = export_gguf(model, path, weight_type)
    assert size == os.path.getsize(path) and os.listdir(tmp_path) == ["model.gguf"]
    reader = gguf.GGUFReader(path)
    meta = fields(reader)
    assert meta["general.architecture"] == "gpt2"
    assert meta["gpt2.context_length"] == 64 and meta["gpt2.embedding_length"] == 64
    assert meta["gpt2.block_count"] == 2 and meta["gpt2.attention.head_count"] == 2
    assert meta["gpt2.feed_forward_length"] == 256
    assert meta["gpt2.attention.layer_norm_epsilon"] == pytest.approx(1e-5)
    assert meta["tokenizer.ggml.model"] == "gpt2" and meta["tokenizer.ggml.pre"] == "gpt-2"
    tokens, merges = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.merges"]
    assert len(tokens) == GPT2_VOCAB and len(merges) == 50000
    # the tokens spell bytes as GPT-2's encoder.json does: " the" is "Ġthe", id 262
    assert tokens[262] == "\u0120the" and tokens[50256] == "<|endoftext|>"
    assert merges[0] == "\u0120 t"
    assert meta["tokenizer.ggml.eos_token_id"] == meta["tokenizer.ggml.bos_token_id"] == 50256
    assert meta["tokenizer.ggml.add_bos_token"] is False

    sd = model.state_dict()
    want = {"token_embd.weight": sd["transformer.wte.weight"][:GPT2_VOCAB],
            "output.weight": sd["lm_head.weight"][:GPT2_VOCAB],  # tied, written anyway
            "position_embd.weight": sd["transformer.wpe.weight"],
            "output_norm.bias": sd["transformer.ln_f.bias"]}
    for i in range(2):
        for ours, theirs in [("ln_1", "attn_norm"), ("attn.c_attn", "attn_qkv"),
                             ("attn.c_proj", "attn_output"), ("ln_2", "ffn_norm"),
                             ("mlp.c_fc", "ffn_up"), ("mlp.c_proj", "ffn_down")]:
            for kind in ("weight", "bias"):
                want[f"blk.{i}.{theirs}.{kind}"] = sd[f"transformer.h.{i}.{ours}.{kind}"]
    got = {t.name: t for t in reader.tensors}
    assert len(got) == 4 + 1 + 2 * 12 and set(want) <= set(got)  # + output_norm.weight
    for name, tensor in want.items():
        t = got[name]
        # ggml lists dimensions innermost first: (in, out) for a matrix stored (out, in)
        assert list(t.shape[::-1]) == list(tensor.shape), name
        expected = tensor.numpy()
        if weight_type == "f16" and tensor.dim() == 2:
            assert t.data.dtype == np.float16
            expected = expected.astype(np.float16)
        else:
            assert t.data.dtype == np.float32
        np.testing.assert_array_equal(t.data.reshape(expected.shape), expected, err_msg=name)


def test_export_gguf_command(model, tmp_path):
    pytest.importorskip("gguf")
    ckpt = checkpoint.save_checkpoint({"model": model.state_dict(), "run_id": "x",
                                       "model_config": vars(model.config)}, str(tmp_path), 1)
    out = run(["train_gpt2.py", "--export-gguf", str(tmp_path / "m.gguf"), "--checkpoint",
               ckpt, "--gguf-type", "f32"]).stdout
    assert out.startswith(f"wrote {tmp_path / 'm.gguf'}: ") and "f32 weights" in out


def test_mistakes_are_one_line(model, tmp_path, monkeypatch, capsys):
    small = train_gpt2.GPT(train_gpt2.GPTConfig(block_size=16, vocab_size=512, n_layer=1,
                                                n_head=1, n_embd=8))
    pytest.importorskip("gguf")
    with pytest.raises(UserError, match="GPT-2's tokenizer 50257"):
        export_gguf(small, str(tmp_path / "small.gguf"))
    assert os.listdir(tmp_path) == []
    with pytest.raises(UserError, match="cannot write"):
        export_gguf(model, str(tmp_path / "no" / "such" / "dir.gguf"))
    with pytest.raises(SystemExit) as exit:
        train_gpt2.main(["--gguf-type", "f32"])
    assert exit.value.code == 2
    assert "--gguf-type goes with --export-gguf FILE" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "gguf", None)
    with pytest.raises(UserError, match=r"^--export-gguf needs the gguf package: pip install "
                                        r"gguf$"):
        export_gguf(model, str(tmp_path / "m.gguf"))


def test_llama_cpp_reads_our_tokens_and_logits(model, tmp_path):
    """llama.cpp itself, through llama-cpp-python: not in CI's install (it compiles llama.cpp,
    minutes); README, "Use the model elsewhere", has a recorded run."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="needs llama-cpp-python "
                                    "(pip install llama-cpp-python; it builds llama.cpp)")
    enc = get_encoding()
    idx = torch.tensor([enc.encode_ordinary(TEXTS[0] + TEXTS[1])])
    with torch.no_grad():
        ours = model(idx)[0][0, :, :GPT2_VOCAB].numpy()  # (T, 50257)
    # f32: ggml's CPU GELU reads a table of f16 values, which alone moves logits by ~1e-4
    for weight_type, atol in (("f32", 5e-4), ("f16", 2e-3)):
        path = str(tmp_path / f"{weight_type}.gguf")
        export_gguf(model, path, weight_type)
        llm = llama_cpp.Llama(model_path=path, n_ctx=64, logits_all=True, verbose=False)
        try:
            for text in TEXTS:
                assert llm.tokenize(text.encode(), add_bos=False, special=False) == \
                    enc.encode_ordinary(text), text
            llm.eval(idx[0].tolist())
            theirs = np.array(llm.scores[:idx.size(1)])  # (T, 50257)
        finally:
            llm.close()  # its destructor raises a TypeError at interpreter shutdown
        assert theirs.shape == ours.shape
        np.testing.assert_allclose(theirs, ours, atol=atol, rtol=0, err_msg=weight_type)

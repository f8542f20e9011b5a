"""
A trained model as one GGUF file, the format llama.cpp reads (and so Ollama and LM Studio):

    python train_gpt2.py --export-gguf gpt2.gguf --checkpoint log/model_19073.pt
    llama-cli -m gpt2.gguf -p "Hello, I'm a language model,"

The file is what llama.cpp's own converter (convert_hf_to_gguf.py) writes for a Hugging Face
GPT-2, written with the same `gguf` package: llama.cpp's `gpt2` architecture, its tensor
names and metadata keys, and GPT-2's tokenizer inside, so no other file is needed. The names
and keys come from the package's constants, not from strings of ours.

This module never imports train_gpt2: the model comes in as an argument.
"""

import os
import pathlib

import numpy as np

from common import UserError, atomic_write, os_error_message
from tokenizer import EOT, GPT2_VOCAB, bpe_tokens_and_merges

GGUF_TYPES = ("f16", "f32")
LAYER_NORM_EPS = 1e-5  # nn.LayerNorm's default, which GPT's blocks use


def import_gguf():
    try:
        import gguf
    except ImportError:
        raise UserError("--export-gguf needs the gguf package: pip install gguf") from None
    return gguf


def export_gguf(model, path, weight_type="f16"):
    """Writes model (train_gpt2.GPT) to path as a GGUF for llama.cpp's gpt2 architecture.
    weight_type "f16" stores the matrices in half precision (the norms and biases stay
    f32, as llama.cpp's converter keeps them); "f32" stores everything as trained.
    -> the file's size in bytes."""
    gguf = import_gguf()
    c = model.config
    if c.vocab_size < GPT2_VOCAB:
        raise UserError(f"--export-gguf: the model has {c.vocab_size} token rows, GPT-2's "
                        f"tokenizer {GPT2_VOCAB}; a GGUF carries that tokenizer, so export a "
                        "model trained with GPT-2's vocabulary (--vocab-size 50304)")
    arch = gguf.MODEL_ARCH.GPT2
    writer = gguf.GGUFWriter(None, gguf.MODEL_ARCH_NAMES[arch])
    writer.add_name(os.path.splitext(os.path.basename(path))[0])
    writer.add_context_length(c.block_size)
    writer.add_embedding_length(c.n_embd)
    writer.add_feed_forward_length(4 * c.n_embd)
    writer.add_block_count(c.n_layer)
    writer.add_head_count(c.n_head)
    writer.add_layer_norm_eps(LAYER_NORM_EPS)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if weight_type == "f16"
                         else gguf.LlamaFileType.ALL_F32)
    add_tokenizer(writer, gguf)
    names = gguf.get_tensor_name_map(arch, c.n_layer)
    for key, tensor in model.state_dict().items():
        # our names are GPT-2's (transformers'), which the package maps to llama.cpp's;
        # our matrices are nn.Linear's (out, in), the layout llama.cpp's converter
        # transposes transformers' Conv1D weights into
        name = names.get_name(key, try_suffixes=(".weight", ".bias"))
        data = tensor.detach().float().cpu().numpy()
        if key in ("transformer.wte.weight", "lm_head.weight"):
            # the padded rows of a 50304 vocabulary are never real tokens; the tied
            # output matrix is written out too, as llama.cpp's gpt2 expects
            data = data[:GPT2_VOCAB]
        if weight_type == "f16" and data.ndim == 2:
            data = data.astype(np.float16)
        writer.add_tensor(name, np.ascontiguousarray(data))
    try:
        with atomic_write(path) as f:
            # the writer opens the temp file by its name; atomic_write then fsyncs and
            # renames it, so a kill never leaves half a GGUF under the name
            writer.write_header_to_file(path=pathlib.Path(f.name))
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
            writer.close()
    except OSError as e:
        raise UserError("--export-gguf: " + os_error_message(e, path, "the checkpoint is "
                                                             "untouched")) from None
    return os.path.getsize(path)


def add_tokenizer(writer, gguf):
    """GPT-2's byte-level BPE, as llama.cpp's converter writes it for GPT-2: its tokens
    (bytes spelled as printable characters), their types, the merges in rank order, and
    <|endoftext|> as the begin, end and unknown token. No token is added in front of a
    prompt, as with transformers' GPT-2 and our own --sample."""
    tokens, merges = bpe_tokens_and_merges()
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.CONTROL if i == EOT else gguf.TokenType.NORMAL
                            for i in range(len(tokens))])
    writer.add_token_merges(merges)
    writer.add_bos_token_id(EOT)
    writer.add_eos_token_id(EOT)
    writer.add_unk_token_id(EOT)
    writer.add_add_bos_token(False)

"""
HellaSwag (Zellers et al. 2019, https://arxiv.org/abs/1905.07830): sentence completion.
Each example is a context and 4 endings, one of them right; the endings written by
humans to be plausible-sounding but wrong are easy for people (~95%) and hard for
small language models (random guessing is 25%).

    python hellaswag.py -m gpt2                            # GPT-2 from Hugging Face
    python hellaswag.py --checkpoint log/model_19072.pt    # a model trained by train_gpt2.py
    python hellaswag.py -m gpt2 --jsonl my_examples.jsonl --limit 100 --verbose

It prints one line at the end, e.g. `10042 acc: 0.2859 acc_norm: 0.2955`.

The data: one JSON object per line. Only three fields are read:

    {"ctx": "A man is sitting on a roof. he", "label": 3,
     "endings": ["is using wrap to wrap a pair of skis.", "...", "...", "starts pulling up roofing on a roof."]}

The real files also carry ctx_a/ctx_b (ctx is ctx_a + " " + ctx_b), activity_label,
source_id, split and split_type. The validation split has 10,042 examples; the test
split's labels are not public (https://github.com/rowanz/hellaswag/issues/5), so
evaluating means evaluating on val.

How a language model answers (build-nanogpt's "completion style"): each ending is
appended to the context, and the model's cross-entropy over the ending's tokens says
how unlikely it finds that ending. The ending with the lowest loss is the prediction:
- acc:      the lowest SUMMED loss. Long endings add more terms, so this favours short ones.
- acc_norm: the lowest MEAN loss per token, which removes that length bias.

Published numbers for the validation split (docstrings of karpathy/build-nanogpt's and
karpathy/llm.c's hellaswag.py):

    gpt2 (124M)    completion style (this file): acc 0.2859, acc_norm 0.2955
                   EleutherAI lm-evaluation-harness (multiple choice): acc 0.2892, acc_norm 0.3114
    gpt2-xl (1.5B) completion style (this file): acc 0.3842, acc_norm 0.4893
                   EleutherAI lm-evaluation-harness (multiple choice): acc 0.4004, acc_norm 0.5089

The GPT-3 paper (Brown et al. 2020) reports 33.7% zero-shot for GPT-3 Small (125M), the
line build-nanogpt's 124M run is drawn against.

Importing this module runs nothing. It never imports the trainer: evaluate() takes the
model as a function from token ids to logits. train_gpt2.py's in-training eval and the
command line call the same evaluate().
"""

import contextlib
import http.client
import json
import os
import sys
import urllib.request
from typing import NamedTuple

import torch
import torch.nn.functional as F
from tqdm import tqdm

from checkpoint import hf_model, load_pretrained, read_run_checkpoint
from common import (OS_ERROR_CAUSES, ArgumentParser, Range, UserError, atomic_write,
                    os_error_message, run_cli, why_unreachable)
from device import autocast, resolve_device, use_huge_pages
from tokenizer import get_encoding

DATA_URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_{split}.jsonl"
SPLIT_SIZES = {"train": 39_905, "val": 10_042, "test": 10_003}  # examples per file
NUM_ENDINGS = 4


class HellaSwagError(UserError):
    """A problem the user can fix (a bad file, no network): the message is one line."""


class HellaSwagFormatError(HellaSwagError):
    """A line of a jsonl file that is not a HellaSwag example; names the file and line."""


class DownloadError(HellaSwagError):
    pass

# -----------------------------------------------------------------------------
# The data: download once into a cache directory, then read and check every line.


def default_cache_dir():
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "hellaswag")


def split_path(split, cache_dir):
    return os.path.join(cache_dir, f"hellaswag_{split}.jsonl")


def count_examples(path):
    with open(path, "rb") as f:
        return sum(1 for line in f if line.strip())


def download_split(split, cache_dir, url=None, num_examples=None):
    """Download one split's jsonl into cache_dir; returns its path.

    The file is streamed into a temporary file beside the target, flushed to disk and
    renamed only after its example count checks out, so an interrupted download never
    leaves a half file under the real name for a later run to trust."""
    url = url or DATA_URL.format(split=split)
    num_examples = num_examples or SPLIT_SIZES[split]
    path = split_path(split, cache_dir)

    def failed(reason):
        return DownloadError(
            f"could not download {url} ({reason}); without internet, copy "
            f"{os.path.basename(path)} into {cache_dir}/ or pass --jsonl FILE")
    # a few seconds to learn there is no network, not urlopen's 30 s timeout
    if reason := why_unreachable(url):
        raise failed(reason)
    os.makedirs(cache_dir, exist_ok=True)
    # the file gets its name only once it is complete and has the right number of examples
    with atomic_write(path) as f:
        try:
            with urllib.request.urlopen(url, timeout=30) as response:
                size = int(response.headers.get("Content-Length") or 0) or None
                with tqdm(total=size, unit="B", unit_scale=True, unit_divisor=1024,
                          desc=os.path.basename(path)) as bar:
                    while chunk := response.read(1 << 20):
                        f.write(chunk)
                        bar.update(len(chunk))
        except (OSError, http.client.HTTPException) as e:  # URLError is an OSError
            if getattr(e, "errno", None) in OS_ERROR_CAUSES:  # the disk, not the network
                raise HellaSwagError(os_error_message(e, path)) from None
            raise failed(getattr(e, "reason", None) or e) from None
        f.flush()
        got = count_examples(f.name)
        if got != num_examples:
            raise DownloadError(f"{url} gave {got} examples, expected {num_examples}; "
                                "the download was cut short or the file changed upstream")
    return path


def parse_example(line, path, lineno):
    """One jsonl line -> {"ctx": str, "endings": [4 str], "label": int}, or
    HellaSwagFormatError naming the file, the line and what is wrong with it."""
    def bad(problem):
        return HellaSwagFormatError(f"{path}:{lineno}: {problem}")
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise bad(f"not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(obj, dict):
        raise bad(f"expected a JSON object, got {type(obj).__name__}")
    missing = [k for k in ("ctx", "endings", "label") if k not in obj]
    if missing:
        raise bad(f"missing field {', '.join(map(repr, missing))}")
    ctx, endings, label = obj["ctx"], obj["endings"], obj["label"]
    if not isinstance(ctx, str) or not ctx:
        # an empty context would leave the first ending token with nothing to be
        # predicted from
        raise bad(f"'ctx' must be a non-empty string, got {ctx!r:.40}")
    if not isinstance(endings, list) or len(endings) != NUM_ENDINGS:
        n = len(endings) if isinstance(endings, list) else type(endings).__name__
        raise bad(f"'endings' must be a list of {NUM_ENDINGS} strings, got {n}")
    for i, ending in enumerate(endings):
        if not isinstance(ending, str):
            raise bad(f"'endings'[{i}] must be a string, got {type(ending).__name__}")
    # bool is a subclass of int in Python: refuse true/false explicitly
    if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < NUM_ENDINGS:
        raise bad(f"'label' must be an integer 0..{NUM_ENDINGS - 1}, got {label!r:.40}")
    return {"ctx": ctx, "endings": endings, "label": label}


def read_jsonl(path, limit=None):
    examples = []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if limit is not None and len(examples) >= limit:
                break
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise HellaSwagFormatError(f"{path}:{lineno}: not UTF-8 ({e.reason})") from None
            if line.strip():  # tolerate blank lines, e.g. a trailing one
                examples.append(parse_example(line, path, lineno))
    if not examples:
        raise HellaSwagFormatError(f"{path}: no examples in the file")
    return examples


def load_examples(split=None, jsonl=None, cache_dir=None, limit=None):
    """The examples of a HellaSwag split ("train", "val" (the default) or "test"),
    downloaded into cache_dir if not there yet, or of a local jsonl file; the first
    `limit` only if given. Every line is checked: HellaSwagFormatError on a bad one."""
    if jsonl is not None:
        if split is not None:
            raise ValueError("pass a split or a jsonl file, not both")
        if not os.path.isfile(jsonl):
            raise HellaSwagError(f"no such file: {jsonl}")
        return read_jsonl(jsonl, limit)
    split = split or "val"
    if split not in SPLIT_SIZES:
        raise HellaSwagError(f"unknown split {split!r}: use one of {', '.join(SPLIT_SIZES)}")
    cache_dir = cache_dir or default_cache_dir()
    path = split_path(split, cache_dir)
    if not os.path.exists(path):
        download_split(split, cache_dir)
    # a file we did not write (e.g. an older script's interrupted download) may be short
    got = count_examples(path)
    if got != SPLIT_SIZES[split]:
        raise HellaSwagError(f"{path} has {got} examples, the {split} split has "
                             f"{SPLIT_SIZES[split]}; delete it to download it again")
    return read_jsonl(path, limit)

# -----------------------------------------------------------------------------
# Rendering and scoring: the one definition of how an example becomes tokens and
# how losses become a prediction. Everything below uses these two functions.


def render_example(example, enc, block_size=None):
    """-> tokens (4, L) long, mask (4, L) long, label int.

    Row i is the context followed by ending i; mask is 0 over the context and 1 over the
    ending, the positions whose loss is scored. Rows are right-padded with 0 to the
    longest of the four (the mask is 0 there too). Endings get a leading space, because
    in running text a word after the context is preceded by one, and GPT-2's tokens
    carry the space: " roof" is one token, "roof" another.

    With block_size, a context too long for the model loses tokens from its START,
    equally in all four rows, so every ending keeps its immediately preceding words.
    """
    # encode_ordinary: the same tokens as enc.encode for any text without special-token
    # strings, and no exception if a file happens to contain "<|endoftext|>"
    ctx_tokens = enc.encode_ordinary(example["ctx"])
    end_tokens = [enc.encode_ordinary(" " + ending) for ending in example["endings"]]
    if block_size is not None:
        room = block_size - max(len(e) for e in end_tokens)  # context tokens that fit
        if room < 1:
            raise HellaSwagError(f"an ending of {block_size - room} tokens does not fit the "
                                 f"model's block size of {block_size} with any context")
        ctx_tokens = ctx_tokens[max(0, len(ctx_tokens) - room):]
    length = len(ctx_tokens) + max(len(e) for e in end_tokens)
    tokens = torch.zeros((NUM_ENDINGS, length), dtype=torch.long)
    mask = torch.zeros((NUM_ENDINGS, length), dtype=torch.long)
    for i, end in enumerate(end_tokens):
        row = ctx_tokens + end
        tokens[i, :len(row)] = torch.tensor(row)
        mask[i, len(ctx_tokens):len(row)] = 1
    return tokens, mask, example["label"]


class Scores(NamedTuple):
    sum_loss: torch.Tensor   # (N, 4) summed cross-entropy over each ending's tokens
    mean_loss: torch.Tensor  # (N, 4) the same divided by the ending's token count
    pred: torch.Tensor       # (N,) argmin of sum_loss, counted by acc
    pred_norm: torch.Tensor  # (N,) argmin of mean_loss, counted by acc_norm


def score_rows(logits, tokens, mask):
    """The loss of each ending and the two predictions, for N examples at once.

    logits (4N, T, V) as the model gives them for tokens (4N, T); mask (4N, T) is 1 over
    the ending tokens; rows 4n..4n+3 are example n's four candidates. Positions where the
    mask is 0 (context, padding) do not count, whatever their logits are.
    """
    # the logits at position t predict the token at t+1
    shift_logits = logits[:, :-1, :]  # (4N, T-1, V)
    shift_tokens = tokens[:, 1:]  # (4N, T-1)
    scored = mask[:, 1:].bool()  # (4N, T-1) True where an ending token is predicted
    # cross-entropy only at the scored positions: the log-softmax over ~50k classes at
    # every context and pad position would be wasted work. fp32 whatever the model's
    # dtype, so a bf16 forward still compares losses in full precision.
    token_loss = torch.zeros(shift_tokens.shape, dtype=torch.float32, device=logits.device)
    token_loss[scored] = F.cross_entropy(shift_logits[scored].float(), shift_tokens[scored],
                                         reduction="none")
    sum_loss = token_loss.sum(dim=1).view(-1, NUM_ENDINGS)  # (N, 4)
    mean_loss = sum_loss / scored.sum(dim=1).view(-1, NUM_ENDINGS)
    return Scores(sum_loss, mean_loss, sum_loss.argmin(dim=1), mean_loss.argmin(dim=1))

# -----------------------------------------------------------------------------
# Evaluation: many examples per forward pass.


class Prediction(NamedTuple):
    pred: int
    pred_norm: int
    label: int
    sum_loss: list  # 4 floats
    mean_loss: list  # 4 floats


class Result(NamedTuple):
    num_total: int
    num_correct: int  # by the summed loss (acc)
    num_correct_norm: int  # by the mean loss (acc_norm)

    @property
    def acc(self):
        return self.num_correct / self.num_total if self.num_total else float("nan")

    @property
    def acc_norm(self):
        return self.num_correct_norm / self.num_total if self.num_total else float("nan")


@torch.no_grad()
def predict(model, examples, *, device, batch_size=16, autocast=contextlib.nullcontext,
            rank=0, world_size=1, enc=None, block_size=None, progress=False):
    """Predictions for this rank's share of the examples, examples[rank::world_size], in
    that order. Arguments as for evaluate()."""
    enc = enc or get_encoding()
    mine = examples[rank::world_size]
    rendered = [render_example(ex, enc, block_size) for ex in mine]
    # Batches of similar lengths waste little on padding. Longest first, so a batch that
    # does not fit in memory fails at once, not at the end. Padding does not change the
    # result: see evaluate()'s docstring.
    order = sorted(range(len(rendered)), key=lambda i: -rendered[i][0].size(1))
    predictions = [None] * len(rendered)
    with tqdm(total=len(rendered), desc="hellaswag", unit="ex", disable=not progress) as bar:
        for start in range(0, len(order), batch_size):
            batch = order[start:start + batch_size]
            length = max(rendered[i][0].size(1) for i in batch)
            tokens = torch.zeros((NUM_ENDINGS * len(batch), length), dtype=torch.long)
            mask = torch.zeros_like(tokens)
            for j, i in enumerate(batch):  # example i fills rows 4j..4j+3, right-padded
                t, m, _ = rendered[i]
                tokens[NUM_ENDINGS * j:NUM_ENDINGS * (j + 1), :t.size(1)] = t
                mask[NUM_ENDINGS * j:NUM_ENDINGS * (j + 1), :m.size(1)] = m
            tokens, mask = tokens.to(device), mask.to(device)
            with autocast():
                logits = model(tokens)
            if not isinstance(logits, torch.Tensor):
                raise TypeError("model(idx) must return the logits (B, T, vocab); wrap a model "
                                "that returns (logits, loss) as `lambda idx: model(idx)[0]`")
            s = score_rows(logits, tokens, mask)
            # one transfer to the CPU per batch, not one per example
            sum_loss, mean_loss = s.sum_loss.tolist(), s.mean_loss.tolist()
            pred, pred_norm = s.pred.tolist(), s.pred_norm.tolist()
            for j, i in enumerate(batch):
                predictions[i] = Prediction(pred[j], pred_norm[j], rendered[i][2],
                                            sum_loss[j], mean_loss[j])
            bar.update(len(batch))
    return predictions


def evaluate(model, examples, *, device, batch_size=16, autocast=contextlib.nullcontext,
             rank=0, world_size=1, enc=None, block_size=None, verbose=False, progress=False):
    """HellaSwag accuracy counts -> Result(num_total, num_correct, num_correct_norm).

    model: a callable idx (B, T) -> logits (B, T, V), in eval mode (no dropout). It sees
      batch_size examples per call, 4 rows each, right-padded with token 0 to the longest
      row. Padding changes nothing: attention is causal, so no real position sees the pad
      after it, and pad positions are not scored. Predictions are those of one example at
      a time, up to float rounding (fp32 logits agree to ~1e-6).
    examples: dicts with ctx, endings, label (load_examples()).
    autocast: a zero-argument callable returning the context manager the forward runs in,
      e.g. `lambda: device.autocast(device_type)` for bf16 where the device has it.
    rank, world_size: this process scores examples[rank::world_size] and returns its own
      counts; the caller sums them over ranks.
    block_size: the model's longest sequence; longer rows lose context tokens from the
      start (see render_example). None: no limit.
    verbose: print the first 10 examples with each ending's loss. progress: a tqdm bar.
    """
    predictions = predict(model, examples, device=device, batch_size=batch_size,
                          autocast=autocast, rank=rank, world_size=world_size, enc=enc,
                          block_size=block_size, progress=progress)
    if verbose:
        for example, p in zip(examples[rank::world_size][:10], predictions):
            print("---")
            print(f"Context:\n {example['ctx']}")
            print("Endings:")
            for i, ending in enumerate(example["endings"]):
                print(f"{i} (loss: {p.mean_loss[i]:.4f} mean, {p.sum_loss[i]:.4f} sum) {ending}")
            print(f"predicted: {p.pred_norm} (by sum: {p.pred}), actual: {p.label}")
    return Result(num_total=len(predictions),
                  num_correct=sum(p.pred == p.label for p in predictions),
                  num_correct_norm=sum(p.pred_norm == p.label for p in predictions))

# -----------------------------------------------------------------------------
# The command line.


def load_for_training(cfg, master=True, barrier=None):
    """The examples of a training run's eval (config.TrainConfig cfg): the master process
    downloads the val split if it is not cached yet, then the other ranks read it.
    barrier: waits for every rank (None: one process)."""
    if cfg.hellaswag_every <= 0:
        return []
    source = dict(split=None if cfg.hellaswag_jsonl else "val",
                  jsonl=cfg.hellaswag_jsonl or None, limit=cfg.hellaswag_limit or None)
    examples = load_examples(**source) if master else []
    if barrier is not None:
        barrier()
    return examples or load_examples(**source)


def load_hf_model(name_or_path, device):
    """Any causal LM transformers can load (a hub name or a saved directory) ->
    (callable idx -> logits, block size)."""
    from transformers import AutoModelForCausalLM  # slow to import; only this path needs it
    hf = load_pretrained(AutoModelForCausalLM, name_or_path, hint="give -m the directory of a "
                         "saved model (e.g. one --export-hf wrote), or --checkpoint PATH")
    hf = hf.float().to(device).eval()  # fp32 weights; bf16 comes from autocast
    c = hf.config
    block_size = getattr(c, "n_positions", None) or getattr(c, "max_position_embeddings", None)
    # use_cache=False: we want logits only, not the keys and values kept for generation
    return (lambda idx: hf(idx, use_cache=False).logits), block_size


def build_parser():
    p = ArgumentParser(description="HellaSwag accuracy of a language model "
                                            "(completion style, as build-nanogpt)")
    which = p.add_mutually_exclusive_group()
    which.add_argument("-m", "--model", default="gpt2",
                       help="a transformers model name or directory (default: gpt2)")
    which.add_argument("--checkpoint", help="a model_XXXXX.pt written by train_gpt2.py, "
                       "or its log dir for the newest")
    data = p.add_mutually_exclusive_group()
    data.add_argument("--split", choices=list(SPLIT_SIZES),
                      help="downloaded on first use into --cache-dir (default: val)")
    data.add_argument("--jsonl", help="a local file of HellaSwag-format examples instead")
    p.add_argument("--cache-dir", default=default_cache_dir(),
                   help="where downloaded splits are kept (default: %(default)s)")
    p.add_argument("--limit", type=int, range=Range(1),
                   help="only the first N examples (default: all)")
    p.add_argument("--batch-size", type=int, default=16, range=Range(1),
                   help="examples per forward pass, 4 rows each (default: %(default)s); "
                        "lower it if memory runs out")
    p.add_argument("--device", default="auto",
                   help="auto, cpu, cuda, cuda:N or mps (default: %(default)s)")
    p.add_argument("--verbose", action="store_true",
                   help="print the first examples with the loss of each ending")
    return p


def main(argv=None):
    # each batch's logits are hundreds of MB: huge pages on a CPU, set before any tensor
    use_huge_pages()
    parser = build_parser()
    args = parser.parse_args(argv)
    parser.check_ranges(args, {"limit": "all", "batch_size": parser.get_default("batch_size")})
    if args.split == "test":
        raise HellaSwagError("the test split's labels are not public "
                             "(github.com/rowanz/hellaswag/issues/5); evaluate on val")
    # the data first: a bad file fails before a big model is loaded
    examples = load_examples(split=args.split, jsonl=args.jsonl, cache_dir=args.cache_dir,
                             limit=args.limit)
    device, device_type = resolve_device(args.device)
    if args.checkpoint:
        # the checkpoint's weights in transformers' GPT-2: the same logits as our GPT
        hf = hf_model(read_run_checkpoint(args.checkpoint)).to(device)
        model, block_size = (lambda idx: hf(idx, use_cache=False).logits), hf.config.n_positions
    else:
        model, block_size = load_hf_model(args.model, device)
    result = evaluate(model, examples, device=device, batch_size=args.batch_size,
                      autocast=lambda: autocast(device_type), block_size=block_size,
                      verbose=args.verbose, progress=True)
    print(f"{result.num_total} acc: {result.acc:.4f} acc_norm: {result.acc_norm:.4f}")


if __name__ == "__main__":
    sys.exit(run_cli(main))

"""HellaSwag: rendering, the scoring rule, batching equal to one example at a time, rank
splits, file checks, the download, and the command line end to end, all on a handful
of hand-written examples and tiny random models."""
import contextlib
import json
import os
import re

import pytest
import torch

import hellaswag
from hellaswag import (HellaSwagError, HellaSwagFormatError, evaluate, load_examples, predict,
                       render_example, score_rows)
from common import run_cli
from conftest import EXAMPLES, run, tiny_hf_gpt2, write_jsonl
from tokenizer import get_encoding

@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    # a random tiny GPT-2 with the real vocabulary, saved where from_pretrained finds it
    path = tmp_path_factory.mktemp("tiny-gpt2")
    tiny_hf_gpt2(n_head=2, n_positions=128).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def hf_model(hf_dir):
    from transformers import GPT2LMHeadModel  # here: its import costs every worker seconds

    hf = GPT2LMHeadModel.from_pretrained(hf_dir).eval()
    return lambda idx: hf(idx, use_cache=False).logits


def run_command(*args):
    # HF_HUB_OFFLINE: a model name that is not on disk fails at once instead of retrying
    return run(["hellaswag.py", *args], env=dict(os.environ, HF_HUB_OFFLINE="1"), timeout=120,
               check=False)


def summary_line(result):
    return f"{result.num_total} acc: {result.acc:.4f} acc_norm: {result.acc_norm:.4f}"

# -----------------------------------------------------------------------------
# rendering and scoring


def test_render_example_tokens_and_mask():
    enc = get_encoding()
    for ex in EXAMPLES[:3]:
        tokens, mask, label = render_example(ex, enc)
        ctx = enc.encode(ex["ctx"])
        ends = [enc.encode(" " + e) for e in ex["endings"]]
        width = len(ctx) + max(len(e) for e in ends)
        assert tokens.shape == mask.shape == (4, width)
        assert tokens.dtype == mask.dtype == torch.long
        assert label == ex["label"]
        for i, end in enumerate(ends):
            pad = width - len(ctx) - len(end)
            assert tokens[i].tolist() == ctx + end + [0] * pad
            assert mask[i].tolist() == [0] * len(ctx) + [1] * len(end) + [0] * pad


def test_render_example_left_truncates_context_to_block_size():
    enc = get_encoding()
    ex = EXAMPLES[6]
    full, full_mask, _ = render_example(ex, enc)
    ends = [enc.encode(" " + e) for e in ex["endings"]]
    block_size = max(len(e) for e in ends) + 3  # room for the last 3 context tokens
    tokens, mask, _ = render_example(ex, enc, block_size=block_size)
    assert tokens.size(1) == block_size
    ctx = enc.encode(ex["ctx"])
    for i, end in enumerate(ends):
        assert tokens[i, :3 + len(end)].tolist() == ctx[-3:] + end
        assert mask[i].sum().item() == len(end)
    # a block size the rows fit in changes nothing
    same, same_mask, _ = render_example(ex, enc, block_size=full.size(1))
    assert torch.equal(same, full) and torch.equal(same_mask, full_mask)
    with pytest.raises(HellaSwagError, match="block size"):
        render_example(ex, enc, block_size=max(len(e) for e in ends))


def planted_logits(row_losses, vocab=8, width=6):
    """Rows of [context token, ending tokens..., pads] whose per-token losses are exactly
    the given ones: logits = log-probabilities with p(target) = exp(-loss)."""
    rows = len(row_losses)
    tokens = torch.zeros((rows, width), dtype=torch.long)
    mask = torch.zeros((rows, width), dtype=torch.long)
    logits = torch.randn(rows, width, vocab) * 50  # garbage wherever nothing is scored
    for r, losses in enumerate(row_losses):
        tokens[r, 0] = 5  # the context
        for t, loss in enumerate(losses, start=1):
            target = (r + t) % vocab
            tokens[r, t], mask[r, t] = target, 1
            p = torch.full((vocab,), (1 - torch.exp(torch.tensor(-loss)).item()) / (vocab - 1))
            p[target] = torch.exp(torch.tensor(-loss))
            logits[r, t - 1] = p.log()  # position t-1 predicts token t
    return logits, tokens, mask


def test_score_rows_sum_and_mean_can_disagree():
    # example 0: ending 1 is one token of loss 1.0 (sum 1.0, mean 1.0); ending 2 is three
    # tokens of 0.5 (sum 1.5, mean 0.5): acc picks the short one, acc_norm the long one.
    # example 1: ending 3 is best by both.
    row_losses = [[2.0, 2.0], [1.0], [0.5, 0.5, 0.5], [3.0],
                  [2.0], [2.5, 2.5], [1.5, 1.5, 1.5, 1.5], [0.2, 0.3]]
    logits, tokens, mask = planted_logits(row_losses)
    s = score_rows(logits, tokens, mask)
    expected_sum = torch.tensor([[sum(r) for r in row_losses[:4]], [sum(r) for r in row_losses[4:]]])
    expected_mean = torch.tensor([[sum(r) / len(r) for r in row_losses[:4]],
                                  [sum(r) / len(r) for r in row_losses[4:]]])
    torch.testing.assert_close(s.sum_loss, expected_sum, atol=1e-4, rtol=0)
    torch.testing.assert_close(s.mean_loss, expected_mean, atol=1e-4, rtol=0)
    assert s.pred.tolist() == [1, 3]
    assert s.pred_norm.tolist() == [2, 3]
    # bf16 logits (autocast on CUDA) are scored in fp32 and give the same answer
    s16 = score_rows(logits.bfloat16(), tokens, mask)
    assert s16.sum_loss.dtype == torch.float32
    assert s16.pred.tolist() == [1, 3] and s16.pred_norm.tolist() == [2, 3]


def test_evaluate_counts_acc_and_acc_norm_separately():
    # a stand-in model under which every token of ending i has loss LOSS[i]; the endings
    # are 2, 1, 3 and 1 tokens long, so the sums are 4.0, 1.0, 1.5, 3.0 (acc picks 1) and
    # the means 2.0, 1.0, 0.5, 3.0 (acc_norm picks 2)
    LOSS = [2.0, 1.0, 0.5, 3.0]
    vocab = 50257

    def model(idx):
        rows, T = idx.shape
        p = torch.tensor(LOSS).neg().exp().repeat(rows // 4)  # (rows,) p(next token)
        logits = ((1 - p) / (vocab - 1)).log().view(rows, 1, 1).repeat(1, T, vocab)
        for r in range(rows):
            for t in range(T - 1):  # position t predicts token t+1
                logits[r, t, idx[r, t + 1]] = p[r].log()
        return logits

    enc = get_encoding()
    endings = ["b c", "b", "b c d", "e"]
    assert [len(enc.encode(" " + e)) for e in endings] == [2, 1, 3, 1]
    examples = [{"ctx": "a", "endings": endings, "label": label} for label in (1, 2, 0)]
    result = evaluate(model, examples, device="cpu", enc=enc)
    assert (result.num_total, result.num_correct, result.num_correct_norm) == (3, 1, 1)
    assert result.acc == pytest.approx(1 / 3) and result.acc_norm == pytest.approx(1 / 3)


# -----------------------------------------------------------------------------
# batching and distribution


@pytest.fixture(scope="module")
def one_at_a_time(hf_model):
    return predict(hf_model, EXAMPLES, device="cpu", batch_size=1)


def test_batched_equals_one_at_a_time(hf_model, one_at_a_time):
    # 10 examples in batches of 4: rows padded to each batch's longest, a short last batch
    batched = predict(hf_model, EXAMPLES, device="cpu", batch_size=4)
    assert [p.label for p in batched] == [ex["label"] for ex in EXAMPLES]  # input order
    for a, b in zip(one_at_a_time, batched):
        assert (a.pred, a.pred_norm, a.label) == (b.pred, b.pred_norm, b.label)
        torch.testing.assert_close(torch.tensor(a.mean_loss), torch.tensor(b.mean_loss),
                                   atol=1e-5, rtol=0)
        torch.testing.assert_close(torch.tensor(a.sum_loss), torch.tensor(b.sum_loss),
                                   atol=1e-4, rtol=0)
    # the losses are real ones: near ln(50257) = 10.8 per token for random weights
    assert all(10 < loss < 11.5 for p in batched for loss in p.mean_loss)


def test_rank_split_counts_add_up(hf_model, one_at_a_time):
    whole = (len(one_at_a_time), sum(p.pred == p.label for p in one_at_a_time),
             sum(p.pred_norm == p.label for p in one_at_a_time))
    for world_size in (2, 3):
        parts = [evaluate(hf_model, EXAMPLES, device="cpu", batch_size=4, rank=r,
                          world_size=world_size) for r in range(world_size)]
        assert [p.num_total for p in parts] == [len(EXAMPLES[r::world_size])
                                                 for r in range(world_size)]
        assert tuple(map(sum, zip(*parts))) == whole


def test_autocast_callable_is_entered_per_forward(hf_model):
    entered = []

    @contextlib.contextmanager
    def spy():
        entered.append(1)
        yield

    evaluate(hf_model, EXAMPLES[:5], device="cpu", batch_size=2, autocast=spy)
    assert len(entered) == 3  # 5 examples in batches of 2


def test_model_returning_a_tuple_gets_a_clear_error(hf_model):
    with pytest.raises(TypeError, match=r"model\(idx\)\[0\]"):
        evaluate(lambda idx: (hf_model(idx), None), EXAMPLES[:2], device="cpu")


def test_our_gpt_predicts_as_transformers(hf_dir, one_at_a_time):
    import train_gpt2
    ours = train_gpt2.GPT.from_pretrained(hf_dir).eval()
    mine = predict(lambda idx: ours(idx)[0], EXAMPLES, device="cpu", batch_size=4)
    for a, b in zip(one_at_a_time, mine):
        assert (a.pred, a.pred_norm) == (b.pred, b.pred_norm)
        torch.testing.assert_close(torch.tensor(a.sum_loss), torch.tensor(b.sum_loss),
                                   atol=1e-4, rtol=0)

# -----------------------------------------------------------------------------
# files and the download


def test_load_examples_reads_three_fields_skips_blank_lines_and_limits(tmp_path):
    path = tmp_path / "ex.jsonl"
    path.write_text("\n".join(json.dumps(ex) for ex in EXAMPLES[:4]) + "\n\n")
    examples = load_examples(jsonl=str(path))
    assert examples == [{k: ex[k] for k in ("ctx", "endings", "label")} for ex in EXAMPLES[:4]]
    assert len(load_examples(jsonl=str(path), limit=2)) == 2


GOOD = json.dumps(EXAMPLES[0])
BAD_LINES = {
    "not valid JSON": '{"ctx": "A man", "endings": [',
    "expected a JSON object": json.dumps(["A man", ["a", "b", "c", "d"], 0]),
    "missing field 'ctx'": json.dumps({"endings": ["a", "b", "c", "d"], "label": 0}),
    "missing field 'endings'": json.dumps({"ctx": "A man", "label": 0}),
    "missing field 'label'": json.dumps({"ctx": "A man", "endings": ["a", "b", "c", "d"]}),
    "'ctx' must be a non-empty string": json.dumps({"ctx": "", "endings": ["a", "b", "c", "d"],
                                                    "label": 0}),
    "'endings' must be a list of 4 strings, got 3": json.dumps(
        {"ctx": "A man", "endings": ["a", "b", "c"], "label": 0}),
    "'endings'[2] must be a string": json.dumps(
        {"ctx": "A man", "endings": ["a", "b", 7, "d"], "label": 0}),
    "'label' must be an integer 0..3, got 4": json.dumps(
        {"ctx": "A man", "endings": ["a", "b", "c", "d"], "label": 4}),
    "'label' must be an integer 0..3, got '1'": json.dumps(
        {"ctx": "A man", "endings": ["a", "b", "c", "d"], "label": "1"}),
    "'label' must be an integer 0..3, got True": json.dumps(
        {"ctx": "A man", "endings": ["a", "b", "c", "d"], "label": True}),
}


@pytest.mark.parametrize("problem", list(BAD_LINES))
def test_bad_line_names_file_line_and_problem(tmp_path, capsys, problem):
    path = str(tmp_path / "bad.jsonl")
    with open(path, "w") as f:
        f.write(f"{GOOD}\n\n{GOOD}\n{BAD_LINES[problem]}\n{GOOD}\n")  # the bad one is line 4
    with pytest.raises(HellaSwagFormatError) as info:
        load_examples(jsonl=path)
    message = str(info.value)
    assert message.startswith(f"{path}:4: ") and problem in message and "\n" not in message
    # the command line says the same in one line and exits non-zero; the data is read
    # before any model is loaded, so the model named here is never touched
    assert run_cli(hellaswag.main, ["-m", "no-such-model", "--jsonl", path]) == 1
    out, err = capsys.readouterr()
    assert out == "" and err == f"error: {message}\n"


def test_download_writes_atomically_and_checks_the_count(tmp_path):
    source = write_jsonl(tmp_path / "upstream.jsonl", EXAMPLES)
    url = "file://" + source
    cache = str(tmp_path / "cache")
    with pytest.raises(hellaswag.DownloadError, match="gave 10 examples, expected 11"):
        hellaswag.download_split("val", cache, url=url, num_examples=11)
    assert os.listdir(cache) == []  # neither the file nor a temporary one is left
    path = hellaswag.download_split("val", cache, url=url, num_examples=len(EXAMPLES))
    assert path == os.path.join(cache, "hellaswag_val.jsonl")
    assert os.listdir(cache) == ["hellaswag_val.jsonl"]
    assert load_examples(jsonl=path) == load_examples(jsonl=source)
    # the cached val split is checked against the real split's size before it is used
    with pytest.raises(HellaSwagError, match="has 10 examples, the val split has 10042"):
        load_examples(split="val", cache_dir=cache)


def test_download_without_network_is_one_line(tmp_path):
    # port 9 on localhost: nothing listens, so the connection is refused at once
    with pytest.raises(hellaswag.DownloadError) as info:
        hellaswag.download_split("val", str(tmp_path), url="http://127.0.0.1:9/hellaswag_val.jsonl")
    assert "could not download" in str(info.value) and "--jsonl" in str(info.value)
    assert "\n" not in str(info.value)
    assert os.listdir(tmp_path) == []

# -----------------------------------------------------------------------------
# the command line, in a subprocess as a user runs it

LINE = re.compile(r"^(\d+) acc: (\d\.\d{4}) acc_norm: (\d\.\d{4})$")


def test_cli_with_a_transformers_model(tmp_path, hf_dir, hf_model):
    path = write_jsonl(tmp_path / "ex.jsonl", EXAMPLES)
    proc = run_command("-m", hf_dir, "--jsonl", path, "--device", "cpu", "--batch-size", "3",
                   "--verbose")
    assert proc.returncode == 0, proc.stderr
    last = proc.stdout.strip().splitlines()[-1]
    assert LINE.match(last)
    assert last == summary_line(evaluate(hf_model, EXAMPLES, device="cpu"))
    assert "Context:\n A woman pours flour" in proc.stdout  # --verbose


def test_cli_with_a_train_gpt2_checkpoint(tmp_path, capsys, hf_dir, hf_model):
    import dataclasses

    import checkpoint
    import train_gpt2
    model = train_gpt2.GPT.from_pretrained(hf_dir)
    checkpoint.save_checkpoint({"model": model.state_dict(),
                                "model_config": dataclasses.asdict(model.config)},
                               str(tmp_path), 7)
    path = write_jsonl(tmp_path / "ex.jsonl", EXAMPLES)
    # in this process, to save a second start of torch; the subprocess test above covers
    # what only a real command line shows
    code = run_cli(hellaswag.main, ["--checkpoint", str(tmp_path / "model_00007.pt"),
                                    "--jsonl", path, "--device", "cpu", "--limit", "6"])
    out, err = capsys.readouterr()
    assert code == 0, err
    # the same weights as the transformers model: the same numbers
    assert out.strip().splitlines()[-1] == summary_line(
        evaluate(hf_model, EXAMPLES[:6], device="cpu"))


def test_cli_errors_are_one_line(tmp_path, capsys):
    good = write_jsonl(tmp_path / "ex.jsonl", EXAMPLES[:2])
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {}}, foreign)
    cases = [
        (["--jsonl", str(tmp_path / "missing.jsonl")], "no such file"),
        (["--jsonl", good, "--device", "tpu"], "unknown device"),
        (["--jsonl", good, "--device", "cpu", "--checkpoint", str(foreign)],
         "not a checkpoint of train_gpt2.py"),
        (["--jsonl", good, "--device", "cpu", "-m", str(tmp_path / "no-model-here")],
         "could not load model"),
        (["--split", "test"], "labels are not public"),
    ]
    for args, expected in cases:
        assert run_cli(hellaswag.main, args) == 1, args
        out, err = capsys.readouterr()
        assert err.startswith("error: ") and expected in err, err
        assert err.count("\n") == 1, err


def test_cli_bad_file_in_a_subprocess(tmp_path):
    # as a user sees it: no traceback, a non-zero exit, the file and line named
    bad = write_jsonl(tmp_path / "bad.jsonl", [EXAMPLES[0], {"ctx": "x", "endings": [], "label": 0}])
    proc = run_command("--jsonl", bad)
    assert proc.returncode != 0
    assert proc.stderr == f"error: {bad}:2: 'endings' must be a list of 4 strings, got 0\n"
    assert proc.stdout == ""

# -----------------------------------------------------------------------------
# Not a test: times batched against one example per forward on a 4-layer, 256-wide GPT-2
# and 200 synthetic examples of HellaSwag-like lengths (contexts of 15-50 words, endings
# of 5-25). From the repository root:
#     python -c "from tests.test_hellaswag import benchmark; benchmark()"


def benchmark(num_examples=200, batch_size=16, repeats=2):
    import random
    import time
    rng = random.Random(0)
    words = ("the a man woman dog runs jumps over field house slowly quickly and then he "
             "she it table water kite road").split()

    def words_(n):
        return " ".join(rng.choice(words) for _ in range(n))

    examples = [{"ctx": words_(rng.randint(15, 50)), "label": rng.randint(0, 3),
                 "endings": [words_(rng.randint(5, 25)) for _ in range(4)]}
                for _ in range(num_examples)]
    hf = tiny_hf_gpt2(n_layer=4, n_embd=256, n_positions=256)
    model = lambda idx: hf(idx, use_cache=False).logits  # noqa: E731
    evaluate(model, examples[:4], device="cpu")  # warm-up
    best = {}
    for _ in range(repeats):  # interleaved, best of each: the machine may be shared
        for bs in (1, batch_size):
            t0 = time.perf_counter()
            result = evaluate(model, examples, device="cpu", batch_size=bs)
            seconds = time.perf_counter() - t0
            best[bs] = min(best.get(bs, seconds), seconds)
            print(f"batch_size {bs:2d}: {seconds:6.2f} s  {summary_line(result)}", flush=True)
    print(f"batched / one at a time: {best[1] / best[batch_size]:.2f}x faster "
          f"({torch.get_num_threads()} threads)")

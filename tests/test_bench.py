"""bench.py measures the right things: its rungs compute what the plain path computes, the
ladder runs end to end, and the CPU benchmarks compare equal amounts of work. Speed
itself is for `python bench.py`, never asserted here."""
import json
import math

import numpy as np
import torch

import bench
import device
import fineweb
from bench import ExplicitAttention, Settings, Shape, build_model, time_training
from conftest import run

SMALL = Shape(n_layer=2, n_head=4, n_embd=64, batch_size=2, seq_len=48)


def tokens(shape, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(50257, (2, shape.batch_size, shape.seq_len), generator=gen)


def test_explicit_attention_gives_sdpa_logits():
    explicit = build_model(Settings(), SMALL, "cpu").eval()
    sdpa = build_model(Settings(flash=True), SMALL, "cpu").eval()
    assert all(isinstance(b.attn, ExplicitAttention) for b in explicit.transformer.h)
    assert not any(isinstance(b.attn, ExplicitAttention) for b in sdpa.transformer.h)
    # the same weights: only the attention's arithmetic differs
    for (name, a), (_, b) in zip(explicit.state_dict().items(), sdpa.state_dict().items()):
        assert torch.equal(a, b), name
    x, _ = tokens(SMALL)
    with torch.no_grad():
        torch.testing.assert_close(explicit(x)[0], sdpa(x)[0], atol=1e-5, rtol=0)


def test_explicit_and_sdpa_train_alike():
    # a few optimizer steps on the same batch: the losses agree step by step, so the
    # flash-attention rung changes the speed and not the training
    explicit = time_training(Settings(), SMALL, "cpu", steps=4, warmup=0)["losses"]
    sdpa = time_training(Settings(flash=True), SMALL, "cpu", steps=4, warmup=0)["losses"]
    assert explicit[-1] < explicit[0]  # it does learn the batch
    np.testing.assert_allclose(explicit, sdpa, atol=1e-4, rtol=0)


def test_bf16_trains_like_fp32():
    # bf16 autocast (on CPUs with bf16 hardware by default) rounds the matmuls' inputs to
    # 8 bits of mantissa: the losses move, but only in the third decimal
    fp32 = time_training(Settings(flash=True), SMALL, "cpu", steps=6, warmup=0)["losses"]
    bf16 = time_training(Settings(flash=True, bf16=True), SMALL, "cpu", steps=6,
                         warmup=0)["losses"]
    assert bf16 != fp32  # autocast did run in bf16
    assert bf16[-1] < bf16[0] - 0.5  # and it learns the batch as fp32 does
    np.testing.assert_allclose(bf16, fp32, atol=2e-2, rtol=0)


def test_padded_vocab_changes_only_the_softmax_denominator():
    # The 50304 model holds the 50257 model's weights plus 47 new embedding rows. Those
    # rows are never targets, so the real tokens' logits are the same, and the loss grows
    # by exactly the padded rows' share of the softmax denominator, log(1 + sum(exp(pad)) /
    # sum(exp(real))): at initialization about log(50304 / 50257), nothing more.
    plain = build_model(Settings(flash=True), SMALL, "cpu").eval()
    padded = build_model(Settings(flash=True, vocab_50304=True), SMALL, "cpu").eval()
    assert padded.config.vocab_size == 50304
    x, y = tokens(SMALL)
    with torch.no_grad():
        logits, loss = plain(x, y)
        padded_logits, padded_loss = padded(x, y)
    torch.testing.assert_close(padded_logits[..., :50257], logits, atol=1e-5, rtol=0)
    share = (torch.logsumexp(padded_logits, -1) - torch.logsumexp(logits, -1)).mean()
    assert math.isclose(padded_loss - loss, share, abs_tol=1e-5)
    assert 0 < padded_loss - loss < 2 * math.log(50304 / 50257)


def test_ladder_runs_end_to_end(tmp_path):
    out = tmp_path / "ladder.json"
    proc = run(["bench.py", "ladder", "--device", "cpu", "--n-layer", "1", "--n-head", "2",
                "--n-embd", "32", "--batch-size", "2", "--seq-len", "32", "--steps", "2",
                "--warmup", "1", "--json", str(out)], timeout=30)
    rows = {row["rung"]: row for row in json.loads(out.read_text())["rungs"]}
    assert list(rows) == [r.name for r in bench.RUNGS + bench.EXTRA_RUNGS]
    measured = ["fp32", "flash attention", "vocab 50304", "fused AdamW", "huge pages"]
    if device.bf16_native("cpu"):
        measured.append("bf16 autocast")
    else:
        assert rows["bf16 autocast"]["skipped"] == "no bf16 in this device's hardware"
    for name in measured:  # what a CPU can measure
        assert not rows[name]["skipped"], rows[name]
        assert rows[name]["ms_per_step"] > 0 and rows[name]["mfu"] is None  # no CPU peak
        assert len(rows[name]["losses"]) == 3  # warm-up and timed steps
    assert rows["TF32"]["skipped"] == "CUDA only"
    assert "--cpu-compile" in rows["torch.compile"]["skipped"]
    lines = proc.stdout.splitlines()
    for name in rows:  # one table line per rung
        assert any(line.startswith(name) for line in lines), name


def test_tokenize_limit_and_fineweb_count_the_same_tokens(tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    bench.make_corpus(corpus, 100_000)
    docs = [json.loads(line)["text"] for line in corpus.read_text().splitlines()]
    sizes = [len(d.encode()) for d in docs]
    assert min(sizes) >= 2000 and max(sizes) < 20_000  # documents of a few KB
    n = bench.count_tokens(docs)
    assert 90_000 < n < 120_000
    # fineweb's encoder does the limit's work plus one <|endoftext|> per document
    assert len(fineweb.encode_documents(docs)) == n + len(docs)


def test_loader_measurement_sees_the_memory_it_compares(tmp_path):
    # a 20M-token shard: loading it whole as int64 must show its 160 MB, the memory map
    # a few pages. (Much smaller arrays can reuse memory the allocator already holds, and
    # then no RSS measurement sees them.)
    shard = str(tmp_path / "bench_train_000001.bin")
    bench.write_sparse_shard(shard, 20_000_000)
    assert fineweb.load_shard(shard).shape == (20_000_000,)  # a valid shard for the loader
    mine = bench.measure_loader("memmap", shard, 8, 1024)
    plain = bench.measure_loader("int64", shard, 8, 1024)
    assert mine["mb"] < 10 and plain["mb"] > 150, (mine, plain)
    assert mine["ms"] > 0 and plain["ms"] > 0


def test_ladder_from_a_rung_turns_the_earlier_ones_on_untimed(tmp_path):
    # from the last rung, which a CPU skips: every rung before it is on and none is timed
    out = tmp_path / "ladder.json"
    run(["bench.py", "ladder", "--device", "cpu", "--n-layer", "1", "--n-head", "2",
         "--n-embd", "32", "--batch-size", "2", "--seq-len", "32", "--steps", "1",
         "--warmup", "0", "--from", "coordinate descent", "--json", str(out)], timeout=30)
    rows = {row["rung"]: row for row in json.loads(out.read_text())["rungs"]}
    assert rows["flash attention"]["skipped"] == "on, not timed (--from)"
    assert rows["huge pages"]["skipped"] == "on, not timed (--from)"
    assert rows["TF32"]["skipped"] == "CUDA only"  # still skipped for its own reason
    assert rows["coordinate descent"]["skipped"] == "CUDA only"
    assert not any("ms_per_step" in row for row in rows.values())
    bad = run(["bench.py", "ladder", "--device", "cpu", "--from", "fp64"], check=False)
    assert bad.returncode == 1 and bad.stderr.startswith("error: --from 'fp64': no such rung")


def test_kernel_groups_of_real_kernel_names():
    # kernel names as torch.profiler reported them for a compiled GPT-2 step on an H100,
    # and aten op names as it reports them on a CPU
    names = {
        "nvjet_tst_256x128_64x4_2x1_v_bz_coopB_TNN": "matmul",
        "cudnn_generated_fort_native_sdpa_sm90_flash_bprop_wgmma_f16_knob_3_64x128x128": "attention",
        "triton_red_fused__log_softmax__to_copy_nll_loss_forward_3": "cross-entropy",
        "triton_per_fused_native_layer_norm_native_layer_norm_backward_12": "elementwise",
        "triton_poi_fused_gelu_gelu_backward_7": "elementwise",
        "void at::native::(anonymous namespace)::multi_tensor_apply_kernel<FusedAdamW>": "optimizer",
        "aten::mm": "matmul",
        "aten::_log_softmax_backward_data": "cross-entropy",
        "aten::_fused_adamw_": "optimizer",
        "aten::native_layer_norm_backward": "elementwise",
    }
    for name, group in names.items():
        assert bench.kernel_group(name) == group, name
    rows = bench.group_times({"aten::mm": 5.0, "aten::addmm": 1.0, "aten::gelu": 2.0})
    assert [(g, us) for g, us, _ in rows] == [("matmul", 6.0), ("elementwise", 2.0)]
    assert rows[0][2] == [("aten::mm", 5.0), ("aten::addmm", 1.0)]  # largest first


def test_profile_command_on_the_cpu(tmp_path):
    out = tmp_path / "profile.json"
    proc = run(["bench.py", "profile", "--device", "cpu", "--n-layer", "1", "--n-head", "2",
                "--n-embd", "32", "--batch-size", "2", "--seq-len", "32", "--steps", "1",
                "--kernels", "2", "--json", str(out)], timeout=60)
    groups = {g: ms for g, ms, _ in json.loads(out.read_text())["groups"]}
    # a training step does all of these, so each group has time in it
    assert {"matmul", "attention", "cross-entropy", "optimizer", "elementwise"} <= set(groups)
    assert all(ms > 0 for ms in groups.values())
    assert "ms/step wall" in proc.stdout and "matmul" in proc.stdout
    # --kernels 2: each group's two largest, one per line, under the group's name
    listing = proc.stdout.split("matmul, its 2 largest (ms/step):\n")[1].splitlines()[:2]
    ms, names = zip(*(line.split() for line in listing))
    assert all(bench.kernel_group(n) == "matmul" for n in names)
    assert float(ms[0]) >= float(ms[1]) > 0

"""The GPT model: GPT-2's parameter count, parity with transformers' GPT-2 on the same
weights (minGPT's test), and KV-cache sampling equal to the plain loop."""
import math

import pytest
import torch

from checkpoint import PretrainedError
from conftest import tiny_hf_gpt2
from train_gpt2 import GPT, GPTConfig, KVCache, flops_per_token, num_params


def test_gpt2_124m_parameter_count():
    model = GPT(GPTConfig(vocab_size=50257))
    assert num_params(model) == 124_439_808
    # tied: one tensor serves as embedding and output projection
    assert model.transformer.wte.weight is model.lm_head.weight
    names = set(model.state_dict())
    for name in ("transformer.wte.weight", "transformer.wpe.weight", "transformer.h.11.ln_1.weight",
                 "transformer.h.0.attn.c_attn.weight", "transformer.h.0.attn.c_proj.bias",
                 "transformer.h.0.ln_2.bias", "transformer.h.0.mlp.c_fc.weight",
                 "transformer.h.0.mlp.c_proj.weight", "transformer.ln_f.weight", "lm_head.weight"):
        assert name in names


def test_init_scales_residual_projections():
    torch.manual_seed(0)
    config = GPTConfig(block_size=64, vocab_size=512, n_layer=8, n_head=4, n_embd=256)
    model = GPT(config)
    residual = (2 * config.n_layer) ** -0.5 * 0.02
    assert model.transformer.h[0].mlp.c_proj.weight.std().item() == pytest.approx(residual, rel=0.05)
    assert model.transformer.h[0].attn.c_proj.weight.std().item() == pytest.approx(residual, rel=0.05)
    assert model.transformer.h[0].mlp.c_fc.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert model.lm_head.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert model.transformer.h[0].attn.c_attn.bias.abs().max().item() == 0


def test_initial_loss_is_uniform():
    # at init every token is about equally likely: loss ~ ln(vocab_size)
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=32, vocab_size=1000, n_layer=2, n_head=2, n_embd=64))
    idx, targets = torch.randint(0, 1000, (2, 4, 32))
    _, loss = model(idx, targets)
    assert abs(loss.item() - math.log(1000)) < 0.1


@pytest.fixture(scope="module")
def hf_pair(tmp_path_factory):
    hf = tiny_hf_gpt2()
    path = tmp_path_factory.mktemp("hf-gpt2")
    hf.save_pretrained(path)
    return hf, GPT.from_pretrained(str(path)).eval()


def test_from_pretrained_logits_match_transformers(hf_pair):
    hf, ours = hf_pair
    idx = torch.randint(0, 50257, (3, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours_logits, _ = ours(idx)
        hf_logits = hf(idx).logits
    torch.testing.assert_close(ours_logits, hf_logits, atol=1e-5, rtol=0)


def test_greedy_continuations_match_transformers(hf_pair):
    hf, ours = hf_pair
    idx = torch.randint(0, 50257, (2, 6), generator=torch.Generator().manual_seed(2))
    ours_out = ours.generate(idx, 30, temperature=0)
    hf_out = hf.generate(idx, max_new_tokens=30, do_sample=False, pad_token_id=0,
                         attention_mask=torch.ones_like(idx))
    assert torch.equal(ours_out, hf_out)


def test_from_pretrained_rejects_other_shapes(tmp_path):
    # a GPT-2 variant whose MLP is not 4x wide cannot be ours: a clear error, not garbage
    hf = tiny_hf_gpt2(n_layer=1, n_head=2, n_embd=32, n_positions=16, vocab_size=100,
                      n_inner=100)
    hf.save_pretrained(tmp_path)
    with pytest.raises(PretrainedError, match="mlp.c_fc.weight has shape"):
        GPT.from_pretrained(str(tmp_path))


def small_model(block_size=64):
    torch.manual_seed(0)
    return GPT(GPTConfig(block_size=block_size, vocab_size=50304, n_layer=2, n_head=2,
                         n_embd=64)).eval()


def test_kv_cache_greedy_equals_plain_loop():
    model = small_model()
    idx = torch.randint(0, 50257, (3, 7), generator=torch.Generator().manual_seed(3))
    cached = model.generate(idx, 50, temperature=0)
    plain = model.generate(idx, 50, temperature=0, use_cache=False)
    assert cached.shape == (3, 57)
    assert torch.equal(cached, plain)


def test_kv_cache_sampling_equals_plain_loop_with_same_seed():
    model = small_model()
    idx = torch.randint(0, 50257, (4, 5), generator=torch.Generator().manual_seed(4))
    cached = model.generate(idx, 40, top_k=50, generator=torch.Generator().manual_seed(7))
    plain = model.generate(idx, 40, top_k=50, generator=torch.Generator().manual_seed(7),
                           use_cache=False)
    assert torch.equal(cached, plain)
    assert cached.max().item() < 50257  # never a padded vocabulary row


def test_sampling_draws_among_the_top_k():
    # each drawn token is one of the top_k likeliest after its prefix, and top_k=1 is greedy
    model = small_model()
    idx = torch.randint(0, 50257, (3, 4), generator=torch.Generator().manual_seed(8))
    out = model.generate(idx, 12, top_k=5, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        logits, _ = model(out[:, :-1])
    top5 = torch.topk(logits[:, 3:, :50257], 5).indices  # (3, 12, 5)
    assert (top5 == out[:, 4:, None]).any(dim=-1).all()
    assert not (top5[..., 0] == out[:, 4:]).all()  # not greedy: a draw
    assert torch.equal(model.generate(idx, 12, top_k=1, generator=torch.Generator()),
                       model.generate(idx, 12, temperature=0))


def test_kv_cache_logits_match_full_forward():
    model = small_model()
    idx = torch.randint(0, 50257, (2, 20), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        full, _ = model(idx)
        cache = KVCache(model.config, 2, "cpu", torch.float32)
        prefill, _ = model(idx[:, :12], cache=cache)
        steps = [model(idx[:, t:t + 1], cache=cache)[0] for t in range(12, 20)]
    torch.testing.assert_close(prefill, full[:, :12], atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.cat(steps, dim=1), full[:, 12:], atol=1e-5, rtol=0)


def test_generate_past_block_size_slides():
    model = small_model(block_size=16)
    idx = torch.randint(0, 50257, (2, 10), generator=torch.Generator().manual_seed(6))
    out = model.generate(idx, 40, temperature=0)
    assert out.shape == (2, 50)
    assert torch.equal(out[:, :10], idx)
    # until the sequence fills the block, the cache agrees with the plain loop
    plain = model.generate(idx, 6, temperature=0, use_cache=False)
    assert torch.equal(out[:, :16], plain)


def test_flops_per_token_formula():
    config = GPTConfig(vocab_size=50304)
    N = 50304 * 768 + 12 * 12 * 768 ** 2
    assert flops_per_token(config, 1024) == 6 * N + 12 * 12 * 12 * 64 * 1024


def test_overfits_a_tiny_batch():
    # the lecture's first sanity check: one batch, many steps, the loss goes to ~0
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, vocab_size=256, n_layer=2, n_head=2, n_embd=64))
    optimizer = model.configure_optimizers(0.0, 3e-3, "cpu")
    x, y = torch.randint(0, 256, (2, 4, 16))
    for _ in range(60):
        optimizer.zero_grad()
        _, loss = model(x, y)
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.1

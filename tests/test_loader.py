"""DataLoaderLite: every window of an epoch exactly once across ranks, shuffled or not,
an exact position to resume from, and clear errors for data that cannot work."""
import os

import numpy as np
import pytest
import torch

import fineweb
from common import UserError
from conftest import write_shards
from train_gpt2 import DataLoaderLite

B, T = 2, 8


def make_shards(tmp_path, lengths):
    # token t of shard s is (1000 * s + t) % 65536: any window tells where it came from
    return write_shards(tmp_path, [(1000 * s + np.arange(n)) % 65536
                                   for s, n in enumerate(lengths)], prefix="t")


def window_id(x):
    return int(x[0, 0])  # first token: unique per window in make_shards' layout


@pytest.mark.parametrize("world_size", [1, 2, 3])
@pytest.mark.parametrize("shuffle", [False, True])
def test_each_window_once_per_epoch(tmp_path, world_size, shuffle):
    # 3 train shards of 6, 4 and 8 windows (plus tokens that do not fill one)
    d = make_shards(tmp_path, [100, 6 * B * T + 1, 4 * B * T + 5, 8 * B * T + 1])
    loaders = [DataLoaderLite(d, "train", B, T, r, world_size, shuffle=shuffle, seed=3)
               for r in range(world_size)]
    n = len(loaders[0])
    assert n == 18
    steps = n // world_size
    seen = [[window_id(ld.next_batch()[0]) for _ in range(steps)] for ld in loaders]
    flat = [w for rank in seen for w in rank]
    assert len(set(flat)) == len(flat) == steps * world_size  # no window twice, no overlap
    for rank in seen[1:]:
        assert not set(rank) & set(seen[0])
    if world_size == 1:
        expected = sorted(1000 * s + i * B * T for s, c in ((1, 6), (2, 4), (3, 8))
                          for i in range(c))
        assert sorted(flat) == expected
        if not shuffle:
            assert flat == expected  # build-nanogpt's order: shard by shard, start to end
        else:
            assert flat != expected
    # x and y are the same window shifted by one token
    x, y = loaders[0].window(0)
    assert x.dtype == torch.int64 and x.shape == (B, T)
    assert torch.equal(x.view(-1)[1:], y.view(-1)[:-1])


def test_epochs_reshuffle_and_agree_across_ranks(tmp_path):
    d = make_shards(tmp_path, [100, 6 * B * T + 1, 6 * B * T + 1])
    a = DataLoaderLite(d, "train", B, T, 0, 2, shuffle=True, seed=1)
    b = DataLoaderLite(d, "train", B, T, 1, 2, shuffle=True, seed=1)
    first = [(window_id(a.next_batch()[0]), window_id(b.next_batch()[0])) for _ in range(6)]
    second = [(window_id(a.next_batch()[0]), window_id(b.next_batch()[0])) for _ in range(6)]
    assert a.epoch == b.epoch == 1
    assert sorted(sum(first, ())) == sorted(sum(second, ()))  # the same windows...
    assert first != second  # ...in a new order
    # the same seed gives the same order; another seed another
    c = DataLoaderLite(d, "train", B, T, 0, 1, shuffle=True, seed=1)
    e = DataLoaderLite(d, "train", B, T, 0, 1, shuffle=True, seed=2)
    assert [window_id(c.next_batch()[0]) for _ in range(12)] != \
        [window_id(e.next_batch()[0]) for _ in range(12)]


def test_state_dict_resumes_exactly(tmp_path):
    d = make_shards(tmp_path, [100, 5 * B * T + 1, 7 * B * T + 1])
    a = DataLoaderLite(d, "train", B, T, shuffle=True, seed=0)
    for _ in range(17):  # into the second epoch
        a.next_batch()
    state = a.state_dict()
    b = DataLoaderLite(d, "train", B, T, shuffle=True, seed=0)
    b.load_state_dict(state)
    for _ in range(20):
        assert torch.equal(a.next_batch()[0], b.next_batch()[0])
    other = DataLoaderLite(d, "train", B, T + 1, shuffle=True, seed=0)
    with pytest.raises(UserError, match="T=8"):
        other.load_state_dict(state)


def test_too_little_data_is_a_clear_error(tmp_path):
    d = make_shards(tmp_path, [100, 2 * B * T + 1])
    DataLoaderLite(d, "train", B, T, 1, 2)
    with pytest.raises(UserError, match="each of 3 ranks needs one"):
        DataLoaderLite(d, "train", B, T, 0, 3)
    with pytest.raises(UserError, match="no train shards"):
        DataLoaderLite(str(tmp_path / "empty"), "train", B, T)


def test_an_empty_shard_adds_no_windows(tmp_path):
    # (0 - 1) // (B*T) is -1: an empty shard must not take a window from the others
    d = make_shards(tmp_path, [100, 0, 3 * B * T + 1, 2 * B * T + 1])
    loader = DataLoaderLite(d, "train", B, T)
    assert loader.counts == [0, 3, 2] and len(loader) == 5
    seen = [window_id(loader.next_batch()[0]) for _ in range(len(loader))]
    assert seen == [2000 + i * B * T for i in range(3)] + [3000 + i * B * T for i in range(2)]
    assert loader.epoch == 0


def test_reads_build_nanogpt_npy_shards(tmp_path):
    tokens = np.arange(3 * B * T + 1, dtype=np.uint16)
    np.save(tmp_path / "edufineweb_train_000001.npy", tokens)
    loader = DataLoaderLite(str(tmp_path), "train", B, T)
    x, y = loader.next_batch()
    assert x.view(-1).tolist() == list(range(B * T))
    assert y.view(-1).tolist() == list(range(1, B * T + 1))


def test_corrupt_shard_is_a_clear_error(tmp_path):
    d = make_shards(tmp_path, [100, 4 * B * T + 1])
    path = os.path.join(d, "t_train_000001.bin")
    with open(path, "r+b") as f:
        f.write(np.int32(12345).tobytes())
    with pytest.raises(fineweb.ShardError, match="t_train_000001.bin"):
        DataLoaderLite(d, "train", B, T)

"""A filesystem that says no: full, read-only, or a file where a directory should be. Each
write of a run (checkpoint, log.txt, export) ends in one line that names the cause, what
was kept and what to do. The disks are real: small tmpfs mounts (conftest.small_fs), as
torch.save on a full disk raises what no hand-made OSError shows."""
import dataclasses
import os

import pytest

import checkpoint
import hellaswag
import train_gpt2
from common import UserError, run_cli
from conftest import EXAMPLES, TINY, fill, write_jsonl

RUN = TINY + ["--max-steps", "6", "--checkpoint-every", "2", "--eval-every", "0"]


def tiny_checkpoint(log_dir, step=1):
    # GPT-2's vocabulary: transformers warns about a smaller one's token ids on export
    model = train_gpt2.GPT(train_gpt2.GPTConfig(block_size=8, vocab_size=50304, n_layer=1,
                                                n_head=1, n_embd=8))
    return checkpoint.save_checkpoint({"model": model.state_dict(), "run_id": "tiny",
                                       "model_config": dataclasses.asdict(model.config)},
                                      str(log_dir), step)


def test_a_full_disk_while_saving_a_checkpoint(shards, small_fs, capsys):
    # room for one checkpoint of the tiny model (about 0.5 MB with Adam's moments), not two:
    # the second save fills the disk inside torch.save, which raises a RuntimeError
    log_dir = os.path.join(small_fs("800k"), "log")
    args = RUN + ["--data-dir", shards, "--log-dir", log_dir]
    assert run_cli(train_gpt2.main, args) == 1
    previous = f"{log_dir}/model_00002.pt"
    err = capsys.readouterr().err
    assert err == (f"error: cannot write {log_dir}/model_00004.pt: no space left on the "
                   f"device; the checkpoint {previous} is intact: free some space, then "
                   "--resume\n")
    assert sorted(os.listdir(log_dir)) == ["log.txt", "model_00002.pt"]  # no temp file left
    assert checkpoint.read_checkpoint(previous)["step"] == 2
    # a resume on the still-full disk trains from the checkpoint and fails the same way
    assert run_cli(train_gpt2.main, args + ["--resume"]) == 1
    assert capsys.readouterr().err == err
    assert sorted(os.listdir(log_dir)) == ["log.txt", "model_00002.pt"]


def test_a_full_disk_while_logging(small_fs, capsys):
    log_dir = small_fs("4m")
    tiny_checkpoint(log_dir)
    fill(log_dir)
    with pytest.raises(UserError) as e:
        checkpoint.log_line(os.path.join(log_dir, "log.txt"), 2, "train", 5.0)
    assert str(e.value) == (f"cannot write {log_dir}/log.txt: no space left on the device; "
                            f"the checkpoint {log_dir}/model_00001.pt is intact: free some "
                            "space, then --resume")


def test_a_full_disk_while_exporting(tmp_path, small_fs, capsys):
    path = tiny_checkpoint(tmp_path)
    out_dir = os.path.join(small_fs("16k"), "hf")  # config.json fits, the weights do not
    assert run_cli(train_gpt2.main, ["--export-hf", out_dir, "--checkpoint", path]) == 1
    assert capsys.readouterr().err == (f"error: --export-hf: cannot write {out_dir}/: no space "
                                       "left on the device; the checkpoint is untouched: free "
                                       "some space, then run again\n")
    assert os.listdir(out_dir) == ["config.json"]  # no half-written weights


def test_a_read_only_log_dir(tmp_path, small_fs, capsys):
    log_dir = small_fs("64k", "ro")
    assert run_cli(train_gpt2.main, TINY + ["--data-dir", str(tmp_path / "nowhere"),
                                            "--log-dir", log_dir]) == 1
    assert capsys.readouterr().err == (f"error: --log-dir {log_dir}: cannot write {log_dir}: "
                                       "the filesystem is read-only; choose a writable place, "
                                       "then run again\n")


def test_a_file_where_a_directory_should_be(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    with pytest.raises(UserError, match="a file stands where a directory should be"):
        checkpoint.log_line(str(tmp_path / "file" / "log.txt"), 0, "train", 1.0)
    out_dir = tmp_path / "file" / "export"
    (tmp_path / "ckpt").mkdir()
    path = tiny_checkpoint(tmp_path / "ckpt")
    assert run_cli(train_gpt2.main, ["--export-hf", str(out_dir), "--checkpoint", path]) == 1
    assert "a file stands where a directory should be" in capsys.readouterr().err


def test_a_full_disk_while_downloading_hellaswag(tmp_path, small_fs):
    # a file:// URL: the download reads a local file, so no network is needed
    source = write_jsonl(tmp_path / "upstream.jsonl", EXAMPLES * 20)
    cache = small_fs("4k")
    with pytest.raises(UserError) as e:
        hellaswag.download_split("val", cache, url="file://" + source, num_examples=200)
    assert str(e.value) == (f"cannot write {cache}/hellaswag_val.jsonl: no space left on the "
                            "device; free some space, then run again")  # not "without internet"
    assert os.listdir(cache) == []

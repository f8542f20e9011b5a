"""--tensorboard and --wandb: both hold what log.txt holds, at its steps, across a resume that
repeats steps; a missing package is one line; other ranks write nothing."""
import glob
import json
import os
import sys

import pytest

import train_gpt2
from common import run_cli
from conftest import TINY, read_log, run
from tracking import RunLog

RUN = TINY + ["--max-steps", "8", "--checkpoint-every", "4", "--keep-checkpoints", "0"]


def tensorboard_scalars(log_dir):
    """{tag: {step: value}} as TensorBoard's own reader shows the event files, purges done."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(log_dir)
    events.Reload()
    scalars = {tag: {e.step: e.value for e in events.Scalars(tag)}
               for tag in events.Tags()["scalars"]}
    counts = {tag: len(events.Scalars(tag)) for tag in events.Tags()["scalars"]}
    return scalars, counts, events.PluginTagToContent("hparams")


def wandb_records(path):
    """The records of an offline W&B run file (run-ID.wandb): W&B's log format, blocks of
    32 KiB holding chunks of 7-byte header (checksum, length, kind) + data, each record a
    wandb_internal_pb2.Record."""
    from wandb.proto import wandb_internal_pb2
    with open(path, "rb") as f:
        data = f.read()
    assert data[:4] == b":W&B"
    pos, pending = 7, b""  # after the file header: ":W&B", magic, version
    while pos + 7 <= len(data):
        room = 32768 - pos % 32768
        if room < 7:  # a block's tail too short for a header is padding
            pos += room
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        if kind == 0:
            break
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a whole record, or the last chunk of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def wandb_runs(log_dir):
    """[(run id, name, config, {step: {key: value}})] of the offline runs under log_dir,
    oldest first."""
    runs = []
    for path in sorted(glob.glob(os.path.join(log_dir, "wandb", "offline-run-*", "*.wandb"))):
        run_id, name, config, history = None, None, {}, {}
        for record in wandb_records(path):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                run_id, name = record.run.run_id, record.run.display_name
                config.update({u.key: json.loads(u.value_json) for u in record.run.config.update})
            elif kind == "history":
                # a key with a "/" comes as its parts
                row = {i.key or "/".join(i.nested_key): json.loads(i.value_json)
                       for i in record.history.item}
                history.setdefault(record.history.step.num, {}).update(row)
        runs.append((run_id, name, config, history))
    return runs


def test_tensorboard_and_wandb_hold_log_txt_across_a_rewind(shards, tmp_path):
    pytest.importorskip("tensorboard")
    pytest.importorskip("wandb")
    log_dir = str(tmp_path / "run")
    env = dict(os.environ, WANDB_MODE="offline", WANDB_SILENT="true", OMP_NUM_THREADS="1")
    run(["train_gpt2.py"] + RUN + ["--data-dir", shards, "--log-dir", log_dir,
                                   "--tensorboard", "--wandb", "tracking-test",
                                   "--wandb-run", "tiny"], env=env)
    # again from step 4: steps 4..7 and the evaluation at 8 are written a second time, and
    # the evaluation at step 4, logged before the checkpoint, is not
    run(["train_gpt2.py", "--resume", os.path.join(log_dir, "model_00004.pt"), "--rewind"],
        env=env)
    logged = read_log(log_dir)
    want = {"train/loss": {s: v for s, k, v in logged if k == "train"},
            "val/loss": {s: v for s, k, v in logged if k == "val"}}
    assert sorted(want["train/loss"]) == list(range(8)) and sorted(want["val/loss"]) == [0, 4, 8]

    scalars, counts, hparams = tensorboard_scalars(log_dir)
    for tag, points in want.items():
        assert scalars[tag] == pytest.approx(points, rel=1e-6)  # event files hold float32
    # beside each train loss: its step's learning rate, gradient norm and speed, no more
    # points than steps; no MFU on a CPU, whose peak is not known
    assert set(scalars) == {"train/loss", "val/loss", "lr", "grad_norm", "tokens_per_sec"}
    assert all(counts[tag] == len(scalars[tag]) for tag in scalars), counts
    assert scalars["lr"][2] == pytest.approx(3e-3) and min(scalars["grad_norm"].values()) > 0
    assert "_hparams_/session_start_info" in hparams  # the config, once

    (id1, name, config, first), (id2, _, _, second) = wandb_runs(log_dir)
    assert id1 == id2 == train_gpt2.read_run_checkpoint(log_dir)["run_id"] and name == "tiny"
    assert config["n_layer"] == 2 and config["wandb"] == "tracking-test"
    assert min(second) == 4  # the resumed run goes on from its checkpoint's step
    history = first  # what W&B shows once synced: at each step, the newer point of a tag
    for step, row in second.items():
        history.setdefault(step, {}).update(row)
    for tag, points in want.items():
        assert {s: row[tag] for s, row in history.items() if tag in row} == points


@pytest.mark.parametrize("flag, package", [(["--tensorboard"], "tensorboard"),
                                           (["--wandb", "p"], "wandb")])
def test_a_missing_package_is_one_line(flag, package, shards, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, package, None)  # `import package` raises ImportError
    log_dir = tmp_path / "run"
    status = run_cli(train_gpt2.main, RUN + flag + ["--data-dir", shards, "--log-dir",
                                                    str(log_dir)])
    err = capsys.readouterr().err
    assert status == 1
    assert err == f"error: --{flag[0][2:]} needs the {package} package: pip install {package}\n"
    assert not log_dir.exists()  # refused before anything was written


def test_only_rank_0_writes(tmp_path):
    other = RunLog(str(tmp_path), master=False)
    other.write(0, "train", 1.0, lr=0.1)
    other.trim(0)
    assert os.listdir(tmp_path) == []
    RunLog(str(tmp_path)).write(3, "val", 2.5)
    assert read_log(str(tmp_path)) == [(3, "val", 2.5)]


def test_every_scalar_reaches_the_trackers_under_its_tag(tmp_path):
    class Recorder:
        points = []

        def log(self, step, points):
            self.points.append((step, points))
    log = RunLog(str(tmp_path))
    log.trackers.append(Recorder())
    log.write(5, "scale", 1024.0)  # fp16's loss scale, its own stream in log.txt
    log.write(5, "train", 2.0, lr=1e-3, mfu=None, tokens_per_sec=100)
    assert Recorder.points == [(5, {"fp16/loss_scale": 1024.0}),
                               (5, {"train/loss": 2.0, "lr": 1e-3, "tokens_per_sec": 100.0})]
    assert read_log(str(tmp_path)) == [(5, "scale", 1024.0), (5, "train", 2.0)]

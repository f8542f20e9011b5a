"""Without a network, every command that would download fails within seconds, with one
line that says what to do, instead of half a minute of retries. No test here opens a
connection to anything but a closed port on this machine."""
import os
import socket
import urllib.request

import pytest

import common
import fineweb
import hellaswag
import train_gpt2
from checkpoint import PretrainedError
from common import run_cli
from conftest import EXAMPLES, refuse_network, run, write_jsonl


@pytest.fixture
def closed_port():
    # a port that was just free: nothing listens there, so a connection is refused at once
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def hub_at_closed_port(monkeypatch, closed_port):
    """The hub check of this process points at the closed port: the hub is out of reach."""
    for name in ("HF_HUB_OFFLINE", "HF_ENDPOINT", "HTTPS_PROXY", "https_proxy", "ALL_PROXY",
                 "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(common, "HUB_URL", f"https://127.0.0.1:{closed_port}")
    return closed_port


def offline_env(tmp_path):
    # HF_HOME: an empty Hugging Face cache, so no model or data set is found there
    return dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf-home"))


def test_why_unreachable(closed_port):
    reason = common.why_unreachable(f"http://127.0.0.1:{closed_port}/x")
    assert reason.startswith(f"127.0.0.1:{closed_port}: ")
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        assert common.why_unreachable(f"http://127.0.0.1:{server.getsockname()[1]}/x") is None
    assert common.why_unreachable("file:///etc/hostname") is None


def test_hf_hub_offline_means_unreachable_without_asking(monkeypatch):
    refuse_network(monkeypatch, AssertionError("HF_HUB_OFFLINE is set, yet a connection was "
                                               "attempted"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert common.why_hub_unreachable() == "HF_HUB_OFFLINE is set"


def test_from_pretrained_without_hub(hub_at_closed_port):
    with pytest.raises(PretrainedError) as info:
        train_gpt2.GPT.from_pretrained("nobody-here/no-such-gpt2")
    message = str(info.value)
    assert "not in the Hugging Face cache" in message and f":{hub_at_closed_port}" in message
    assert "directory" in message and "\n" not in message


def test_hellaswag_model_without_hub(tmp_path, hub_at_closed_port, capsys):
    jsonl = write_jsonl(tmp_path / "ex.jsonl", EXAMPLES[:2])
    assert run_cli(hellaswag.main, ["-m", "nobody-here/no-such-gpt2", "--jsonl", jsonl,
                                    "--device", "cpu"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--checkpoint" in err and "not in the Hugging Face" in err


def test_hellaswag_model_with_hf_hub_offline(tmp_path):
    # as a user runs it: one line on stderr, none of transformers' retry lines
    jsonl = write_jsonl(tmp_path / "ex.jsonl", EXAMPLES[:2])
    out = run(["hellaswag.py", "-m", "gpt2", "--jsonl", jsonl, "--device", "cpu"],
              env=offline_env(tmp_path), check=False)
    assert out.returncode == 1
    assert out.stderr == ("error: could not load model 'gpt2': it is not in the Hugging Face "
                          "cache and the hub is out of reach (HF_HUB_OFFLINE is set); give -m "
                          "the directory of a saved model (e.g. one --export-hf wrote), or "
                          "--checkpoint PATH\n")


def test_hellaswag_download_without_network(tmp_path, closed_port, monkeypatch):
    def no_urlopen(*args, **kwargs):
        raise AssertionError("urlopen was called: the quick check should have failed first")
    monkeypatch.setattr(urllib.request, "urlopen", no_urlopen)
    with pytest.raises(hellaswag.DownloadError) as info:
        hellaswag.download_split("val", str(tmp_path / "cache"),
                                 url=f"https://127.0.0.1:{closed_port}/hellaswag_val.jsonl")
    assert "--jsonl FILE" in str(info.value) and "\n" not in str(info.value)
    assert not os.path.exists(tmp_path / "cache")


def test_fineweb_without_hub(tmp_path, hub_at_closed_port, capsys):
    assert run_cli(fineweb.main, ["--out-dir", str(tmp_path / "shards")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "python fineweb.py --input FILE" in err


def test_fineweb_with_hf_hub_offline(tmp_path):
    # datasets reads its cache only, at once: empty here, so one line naming --input
    out = run(["fineweb.py", "--out-dir", str(tmp_path / "shards")], env=offline_env(tmp_path),
              check=False)
    assert out.returncode == 1
    assert out.stderr.count("\n") == 1 and "HF_HUB_OFFLINE is set" in out.stderr
    assert "--input" in out.stderr

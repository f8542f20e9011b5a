"""play.ipynb runs top to bottom headless, on the log dir of a real (tiny) run and on one
with neither checkpoints nor HellaSwag lines; `--plot` writes the notebook's figure as a
PNG. The notebook is executed in memory: the file on disk keeps its empty outputs."""
import os

import nbformat
import pytest
from nbclient import NotebookClient

import train_gpt2
from common import run_cli
from conftest import ROOT, SHAKESPEARE_TINY, run

NOTEBOOK = os.path.join(ROOT, "play.ipynb")

# 8 steps with an evaluation at 0, 4 and 8: curves for the notebook to draw
SMALL_RUN = ["train_gpt2.py", *SHAKESPEARE_TINY, "--max-steps", "8", "--eval-every", "4"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    log_dir = str(tmp_path_factory.mktemp("run") / "log")
    run(SMALL_RUN + ["--log-dir", log_dir])
    return log_dir


def execute(log_dir, monkeypatch):
    """Run every cell with LOG_DIR=log_dir in a python3 kernel started in the repository
    root, as Jupyter would; returns the executed notebook (a cell's error raises)."""
    nb = nbformat.read(NOTEBOOK, as_version=4)
    monkeypatch.setenv("LOG_DIR", log_dir)  # the kernel inherits this process's environment
    NotebookClient(nb, timeout=120, kernel_name="python3",
                   resources={"metadata": {"path": ROOT}}).execute()
    return nb


def printed(nb):
    return "".join(out.get("text", "") for cell in nb.cells if cell.cell_type == "code"
                   for out in cell.outputs if out.output_type == "stream")


def images(nb):
    return sum("image/png" in out.get("data", {}) for cell in nb.cells
               if cell.cell_type == "code" for out in cell.outputs)


def plotting_cells(nb):
    return sum(cell.cell_type == "code" and "plt.show()" in cell.source for cell in nb.cells)


def test_notebook_is_committed_clean():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    assert nb.nbformat == 4
    assert nb.metadata.kernelspec.name == "python3"
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, cell.source[:60]


def test_notebook_on_a_run(run_dir, monkeypatch):
    nb = execute(run_dir, monkeypatch)
    text = printed(nb)
    assert "min train loss: " in text and "min val loss: " in text
    assert "max HellaSwag acc_norm: none in the log" in text  # the preset runs no HellaSwag
    assert "model_00008.pt: step 8, preset shakespeare" in text
    for i in range(4):
        assert f"sample {i}: Hello, I'm a language model," in text
    assert "equal to the batch of 4: True" in text
    assert "the gradient is 4.0000 times too big" in text
    assert "x (4, 32), y (4, 32)" in text
    assert images(nb) >= plotting_cells(nb) >= 4  # loss, wpe, two residual-stream plots


def test_notebook_without_checkpoint(tmp_path, monkeypatch):
    # a log with HellaSwag lines, a malformed line and no checkpoint beside it: the model
    # cells skip, the rest runs
    log_dir = tmp_path / "log"
    log_dir.mkdir()
    (log_dir / "log.txt").write_text("0 val 10.9\n0 hella 0.25\n0 train 10.95\n1 train 9.5\n"
                                     "2 val 9.1\n2 hella 0.3\nnot a log line\n2 train 8.75\n")
    nb = execute(str(log_dir), monkeypatch)
    text = printed(nb)
    # the malformed line: skipped, with one warning for the cell that reads and plots the log
    assert text.count("warning:") == 1
    assert f"warning: {log_dir}/log.txt: skipped 1 malformed line(s)" in text
    assert f"no checkpoint in {log_dir}/" in text
    assert "min train loss: 8.7500 at step 2" in text
    assert "min val loss: 9.1000 at step 2" in text
    assert "max HellaSwag acc_norm: 0.3000 at step 2" in text
    assert "sample 0:" not in text
    assert images(nb) >= plotting_cells(nb) - 1  # all but the position embeddings


def test_plot_command_writes_png(run_dir):
    out = run(["train_gpt2.py", "--plot", run_dir])
    path = os.path.join(run_dir, "loss.png")
    assert path in out.stdout
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert os.path.getsize(path) > 1000


def test_plot_command_without_log(tmp_path):
    out = run(["train_gpt2.py", "--plot", str(tmp_path)], check=False)
    assert out.returncode == 1
    assert out.stderr.strip() == f"error: --plot: no log.txt in {tmp_path}/; give the --log-dir of a run"
    assert not os.path.exists(tmp_path / "loss.png")


def test_plot_command_skips_malformed_lines(tmp_path, capsys):
    (tmp_path / "log.txt").write_text("0 val 10.9\n0 train 10.95\n1 train 9.5\n1 trai")
    assert run_cli(train_gpt2.main, ["--plot", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert out.count("warning:") == 1
    assert f"warning: {tmp_path}/log.txt: skipped 1 malformed line(s)" in out
    assert os.path.getsize(tmp_path / "loss.png") > 1000

"""
The plot of a run: its loss and HellaSwag curves from log.txt, against the figures of
OpenAI's GPT-2 and of GPT-3 at the same size (`python train_gpt2.py --plot LOG_DIR` and
play.ipynb draw it).
"""

import os

from checkpoint import list_checkpoints, read_checkpoint, read_log
from common import UserError, os_error_cause

# Reference lines. val: the FineWeb-Edu val loss of OpenAI's GPT-2 (124M), as
# build-nanogpt's play.ipynb draws it. hella_gpt2: HellaSwag acc_norm of OpenAI's GPT-2
# checkpoints, completion style as hellaswag.py scores it: 0.2955 (124M) and 0.4893 (xl)
# from build-nanogpt's and llm.c's hellaswag.py; medium and large from build-nanogpt's
# play.ipynb. hella_gpt3: GPT-3 zero-shot at the same sizes (Brown et al. 2020, appendix H).
REFERENCE = {
    "gpt2": {"val": 3.2924, "hella_gpt2": 0.2955, "hella_gpt3": 0.337},
    "gpt2-medium": {"hella_gpt2": 0.375224, "hella_gpt3": 0.436},
    "gpt2-large": {"hella_gpt2": 0.431986, "hella_gpt3": 0.510},
    "gpt2-xl": {"hella_gpt2": 0.4893, "hella_gpt3": 0.547},
}
REFERENCE["gpt3-small"] = REFERENCE["gpt2"]  # the same 124M shape


def plot_log(log_dir, preset=None, streams=None):
    """The loss and HellaSwag curves of log_dir/log.txt, with GPT-2's and GPT-3's figures
    as reference lines (the plot play.ipynb draws). preset picks the reference figures;
    None reads it from the newest checkpoint. streams: the log as read_log returned it, if
    the caller has read it already. Returns the matplotlib figure."""
    import matplotlib.pyplot as plt
    if preset is None:
        found = list_checkpoints(log_dir)
        preset = read_checkpoint(found[-1], mmap=True)["config"]["preset"] if found else "gpt2"
    if streams is None:
        streams = read_log(os.path.join(log_dir, "log.txt"))
    ref = REFERENCE.get(preset, {})
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(14, 5))
    for name, style in (("train", {"alpha": 0.6}), ("val", {"marker": "."})):
        if name in streams:
            ax1.plot(*streams[name], label=f"{name} loss", **style)
    if ref.get("val"):
        ax1.axhline(ref["val"], color="r", ls="--", label=f"OpenAI GPT-2 ({preset}) val loss")
    ax1.set_xlabel("step")
    ax1.set_ylabel("loss")
    ax1.legend()
    if "hella" in streams:
        ax2.plot(*streams["hella"], label="this model")
    for label, key, color in (("GPT-2", "hella_gpt2", "r"), ("GPT-3", "hella_gpt3", "g")):
        if ref.get(key):
            ax2.axhline(ref[key], color=color, ls="--", label=f"{label} checkpoint")
    ax2.set_xlabel("step")
    ax2.set_ylabel("HellaSwag acc_norm")
    if ax2.lines:
        ax2.legend()
    else:
        ax2.text(0.5, 0.5, "no HellaSwag evaluations", ha="center", transform=ax2.transAxes)
    fig.tight_layout()
    return fig


def save_plot(log_dir, preset=None):
    """LOG_DIR/log.txt drawn into LOG_DIR/loss.png (--plot)."""
    if not os.path.isfile(os.path.join(log_dir, "log.txt")):
        raise UserError(f"--plot: no log.txt in {log_dir}/; give the --log-dir of a run")
    path = os.path.join(log_dir, "loss.png")
    try:
        plot_log(log_dir, preset).savefig(path, dpi=100)
    except OSError as e:
        raise UserError(f"--plot: cannot write {path}: {os_error_cause(e)}; make {log_dir}/ "
                        "writable, or copy log.txt somewhere writable") from None
    print(f"wrote {path}")

"""
Where a run's measurements go: log.txt always, and TensorBoard and Weights & Biases when
their flags ask, so a run can be watched live the way people watch runs.

    python train_gpt2.py --preset shakespeare --tensorboard    # then: tensorboard --logdir .
    python train_gpt2.py --preset shakespeare --wandb PROJECT --wandb-run NAME

Each package is imported only when its flag is given. The trackers get what log.txt gets,
at the same steps, under tags that say what they are (TAGS), and beside the train loss the
step's other numbers (lr, grad_norm, tokens_per_sec, mfu, or whatever the training script
passes along). Only rank 0 writes.

A resumed run continues the same curves. The W&B run's id is the training run's own id,
which every checkpoint carries. TensorBoard forgets what an earlier process wrote from the
resume step on (SummaryWriter's purge_step), so a run that went on past its checkpoint, or
was rewound, has no duplicate points; the evaluations that log.txt keeps at that step are
written again.

This module never imports train_gpt2.
"""

import contextlib
import dataclasses
import os

from checkpoint import log_line, read_log, trim_log
from common import UserError

# log.txt's streams -> the trackers' tags
TAGS = {"train": "train/loss", "val": "val/loss", "hella": "hellaswag/acc_norm",
        "scale": "fp16/loss_scale", "skipped": "fp16/skipped_steps"}
PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}  # flag -> the package it needs


def check_packages(cfg):
    """One line for a tracking flag whose package is not installed, before any work."""
    for flag, package in PACKAGES.items():
        if getattr(cfg, flag):
            try:
                __import__(package)
            except ImportError:
                raise UserError(f"--{flag} needs the {package} package: pip install "
                                f"{package}") from None


class RunLog:
    """log.txt of a run, and the trackers that get each of its lines. Rank 0 writes; on the
    other ranks (master=False) every method does nothing."""

    def __init__(self, log_dir, master=True):
        self.path = os.path.join(log_dir, "log.txt")
        self.master = master
        self.trackers = []

    def trim(self, step, keep_evaluations=True):
        if self.master:
            trim_log(self.path, step, keep_evaluations)

    def write(self, step, stream, value, **scalars):
        """`STEP STREAM VALUE` into log.txt; the value under its tag and the scalars under
        their names into every tracker (a scalar that is None was not measured)."""
        if not self.master:
            return
        log_line(self.path, step, stream, value)
        points = {TAGS.get(stream, stream): value, **scalars}
        points = {tag: float(v) for tag, v in points.items() if v is not None}
        for tracker in self.trackers:
            tracker.log(step, points)

    @contextlib.contextmanager
    def tracking(self, cfg, run_id, start_step):
        """The trackers cfg asks for, open for the with block; W&B hears whether it ended
        well."""
        if self.master and cfg.tensorboard:
            kept = read_log(self.path) if start_step > 0 and os.path.exists(self.path) else {}
            again = {TAGS.get(stream, stream): values[steps.index(start_step)]
                     for stream, (steps, values) in kept.items() if start_step in steps}
            self.trackers.append(TensorBoard(cfg, start_step, again))
        if self.master and cfg.wandb:
            self.trackers.append(WandB(cfg, run_id, start_step))
        ok = False
        try:
            yield self
            ok = True
        finally:
            for tracker in self.trackers:
                tracker.close(ok)
            self.trackers = []


def run_config(cfg):
    # hparams take numbers, strings and booleans: None ("decided by the device") as text
    return {k: v if isinstance(v, (bool, int, float, str)) else str(v)
            for k, v in dataclasses.asdict(cfg).items()}


class TensorBoard:
    """Event files in the run's log dir: `tensorboard --logdir` on it, or on the folder
    above to compare runs (each named by its log dir)."""

    def __init__(self, cfg, start_step, points_at_start):
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import hparams
        # the START marker at purge_step hides the events of steps >= start_step that an
        # earlier process wrote: a fresh run's from 0 on (a previous run's, kept aside)
        self.writer = SummaryWriter(cfg.log_dir, purge_step=start_step)
        if start_step == 0:
            for summary in hparams(run_config(cfg), {"val/loss": None}):
                self.writer.file_writer.add_summary(summary)
        self.log(start_step, points_at_start)

    def log(self, step, points):
        for tag, value in points.items():
            self.writer.add_scalar(tag, value, step)

    def close(self, ok):
        self.writer.close()


class WandB:
    """A W&B run whose id is the training run's: a resume continues it. Offline
    (WANDB_MODE=offline), it lies under LOG_DIR/wandb/ for `wandb sync`."""

    def __init__(self, cfg, run_id, start_step):
        import wandb
        self.run = wandb.init(project=cfg.wandb, name=cfg.wandb_run or None, id=run_id,
                              resume="allow", dir=cfg.log_dir, config=run_config(cfg),
                              allow_val_change=True)  # a resume may change --max-steps
        # W&B ignores (with a warning each) the steps below those it holds; a resume
        # repeats them bit for bit, so nothing is lost by not sending them
        self.first_step = max(start_step, self.run.step)

    def log(self, step, points):
        if step >= self.first_step:
            self.run.log(points, step=step)

    def close(self, ok):
        self.run.finish(exit_code=0 if ok else 1)

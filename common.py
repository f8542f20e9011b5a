"""
What every script of this repository shares: the one error class for mistakes a user can
fix and the way an entry point reports them, the range each numeric flag accepts, the
cause of a failed write in words, a quick look at whether the network answers before a
download, files that appear whole or not at all, and a lock that keeps two processes out
of one directory.

Only the standard library: every module can import it, fineweb.py's workers included,
without paying for torch.
"""

import argparse
import contextlib
import errno
import math
import os
import signal
import sys
import time

# -----------------------------------------------------------------------------
# Errors: one base class. Every entry point catches it, prints "error: MESSAGE" on one
# line and exits non-zero; anything else is a bug and keeps its traceback.


class UserError(Exception):
    """A mistake the user can fix: bad flag, missing data, corrupt file. The message is one
    line that says what is wrong and what to do."""
    prefix = "error: "
    exit_code = 1


def launched_rank0():
    """True but in torchrun's workers of rank 1 and up: for what only one process should
    print, before (or without) a process group to ask."""
    return os.environ.get("RANK", "0") == "0"


def run_cli(main, argv=None):
    """main(argv) for an entry point: -> its exit status. A UserError becomes one line on
    stderr; under torchrun only rank 0 prints it, as every rank meets the same error."""
    rank0 = launched_rank0()
    try:
        return main(argv) or 0
    except UserError as e:
        if rank0:
            print(f"{e.prefix}{e}", file=sys.stderr)
        return e.exit_code
    except OSError as e:  # a write that no caller named: still one line, if it is the disk's
        if e.errno not in OS_ERROR_CAUSES:
            raise
        if rank0:
            print(f"error: {os_error_message(e, e.filename or 'a file')}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # a second Ctrl-C, or one outside a training loop
        if rank0:
            print("interrupted", file=sys.stderr)
        return 130

# -----------------------------------------------------------------------------
# Command lines: argparse's errors in one line, the range of every numeric flag, and the
# cause of a failed write in words


class Range:
    """The values a numeric flag accepts: from `low` to `high` (None: no bound), `low`
    itself left out with above=True. `zero` says what 0 means where 0 switches the thing
    off, and --help says so. nan and inf are in no range."""

    def __init__(self, low=None, high=None, above=False, zero=None):
        self.low, self.high, self.above, self.zero = low, high, above, zero

    def __contains__(self, value):
        if not math.isfinite(value):
            return False
        if value == 0 and self.zero:
            return True
        return ((self.low is None or (value > self.low if self.above else value >= self.low))
                and (self.high is None or value <= self.high))

    def __str__(self):
        low, high = number(self.low), number(self.high)
        text = "" if self.low is None else f"{'above' if self.above else 'at least'} {low}"
        if self.high is not None:
            text = (f"{low} to {high}" if text and not self.above else
                    f"{text}, at most {high}" if text else f"at most {high}")
        return f"0 ({self.zero}) or {text}" if self.zero else text


def number(value):
    return f"{value:g}" if isinstance(value, float) else str(value)


def check_ranges(values, ranges, defaults):
    """The one check of every numeric flag: values, ranges and defaults are dicts keyed by
    the flag's name as in a config field (max_lr for --max-lr). A value outside its range
    is refused with one line that names the flag, the value, the range and the default."""
    for name, valid in ranges.items():
        value = values.get(name)  # a number, or a word such as --batch-size auto
        if isinstance(value, (int, float)) and value not in valid:
            flag = "--" + name.replace("_", "-")
            raise UserError(f"{flag} {number(value)} is out of range: use {valid} "
                            f"(default {number(defaults.get(name))})")


class ArgumentParser(argparse.ArgumentParser):
    """argparse with its errors on one line, like a UserError, instead of the whole usage
    block (subcommands' parsers inherit it). A numeric flag declares its valid values as
    add_argument(..., range=Range(...)), which --help shows; check_ranges(args) checks them."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.ranges = {}

    def add_argument(self, *args, range=None, **kwargs):
        if range is not None:
            kwargs["help"] = f"{kwargs['help']} [{range}]"
        action = super().add_argument(*args, **kwargs)
        if range is not None:
            self.ranges[action.dest] = range
        return action

    def check_ranges(self, args, defaults=None):
        check_ranges(vars(args), self.ranges, defaults or
                     {name: self.get_default(name) for name in self.ranges})

    def error(self, message):
        self.exit(2, f"error: {message} (see --help)\n")


# What an OSError's errno means for the user, in the words that say what to do about it
OS_ERROR_CAUSES = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "the disk quota is used up",
    errno.EROFS: "the filesystem is read-only",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
    errno.ENOTDIR: "a file stands where a directory should be",
    errno.EEXIST: "a file stands where a directory should be",
    errno.EISDIR: "a directory stands where a file should be",
}


def os_error_cause(e):
    return OS_ERROR_CAUSES.get(e.errno) or e.strerror or str(e)


def os_error_in(e):
    """The OSError behind a failed write, or None. Some writers hide it: torch.save's zip
    writer, on a full disk, raises a RuntimeError ("unexpected pos") while the OSError
    unwinds, which then stays only in the RuntimeError's context."""
    while e is not None and not isinstance(e, OSError):
        e = e.__context__
    return e


def os_error_message(e, path, kept="", then="run again"):
    """One line for an OSError while writing path: its cause in words, what is `kept`
    (the newest checkpoint, say) and what to do."""
    todo = ("free some space" if e.errno in (errno.ENOSPC, errno.EDQUOT) else
            "choose a writable place" if e.errno in (errno.EROFS, errno.EACCES, errno.EPERM)
            else "move it or choose another path" if e.errno in (errno.ENOTDIR, errno.EEXIST,
                                                                 errno.EISDIR)
            else "fix that")
    return f"cannot write {path}: {os_error_cause(e)}; {kept + ': ' if kept else ''}{todo}, " \
           f"then {then}"

# -----------------------------------------------------------------------------
# The network: ask once, quickly, before a download. Without this, Hugging Face's libraries
# retry an unreachable hub for half a minute, printing a line each time, before they fail.

HUB_URL = "https://huggingface.co"  # HF_ENDPOINT (a mirror) replaces it, as in huggingface_hub


def hub_offline():
    """HF_HUB_OFFLINE=1: the user says there is no network; Hugging Face's libraries then
    read their cache only, at once."""
    return os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")


def why_unreachable(url, timeout=3.0):
    """Why no TCP connection to url's host opens within `timeout` seconds (DNS included),
    or None when one does. A non-network url (file://) is always reachable; with a proxy
    set, the proxy is what must answer."""
    import socket
    import threading
    import urllib.parse
    import urllib.request
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https"):
        return None
    proxy = urllib.request.getproxies().get(parts.scheme)
    if proxy and not urllib.request.proxy_bypass(parts.hostname):
        parts = urllib.parse.urlsplit(proxy if "://" in proxy else "http://" + proxy)
    address = (parts.hostname, parts.port or (443 if parts.scheme == "https" else 80))
    outcome = []

    def connect():
        try:
            socket.create_connection(address, timeout=timeout).close()
            outcome.append(None)
        except OSError as e:
            outcome.append(f"{address[0]}:{address[1]}: {e.strerror or e}")
    # a thread, because the DNS lookup inside create_connection ignores the timeout
    thread = threading.Thread(target=connect, daemon=True)
    thread.start()
    thread.join(timeout)
    return outcome[0] if outcome else f"{address[0]}:{address[1]}: no answer in {timeout:g} s"


def why_hub_unreachable():
    """Why the Hugging Face hub cannot be reached now, or None when it can."""
    if hub_offline():
        return "HF_HUB_OFFLINE is set"
    return why_unreachable(os.environ.get("HF_ENDPOINT") or HUB_URL)

# -----------------------------------------------------------------------------
# Files


@contextlib.contextmanager
def atomic_write(path, mode="wb"):
    """Open a file whose content appears under `path` only once it is complete.

    Nobody may ever see half a file under its final name: we write a temp file in the same
    directory (so os.replace is a rename), fsync so the bytes are on disk before the name
    points at them, then rename, which replaces the old file in one step. If the block
    raises, the temp file is removed and `path` is untouched. The temp name carries the
    process id, so two processes never write into one temp file."""
    path = os.fspath(path)
    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.{os.getpid()}.tmp")
    try:
        with open(tmp, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


class DirLock:
    """An exclusive lock on a directory for as long as this process holds it: a second
    process that asks for it gets a UserError naming `what` holds it. The lock is the
    kernel's (flock on the directory itself), so it leaves no file behind and goes away
    with the process, even after kill -9."""

    def __init__(self, directory, what):
        import fcntl
        self.fd = os.open(directory, os.O_RDONLY)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(self.fd)
            raise UserError(f"{directory}/ is in use by another {what}; wait for it to "
                            "finish, or use another directory") from None

    def release(self):
        os.close(self.fd)  # closing drops the flock

# -----------------------------------------------------------------------------
# Signals


class StopRequest:
    """SIGINT (Ctrl-C) and SIGTERM (how cloud machines are preempted) ask the run to stop:
    it finishes the optimizer step under way, saves a checkpoint and exits. A second
    signal stops at once; the newest complete checkpoint is untouched either way."""

    def __init__(self):
        self.signum = 0

    def __enter__(self):
        self.previous = {s: signal.signal(s, self.handle)
                         for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)

    def handle(self, signum, frame):
        if self.signum:
            raise KeyboardInterrupt  # the second signal
        self.signum = signum
        if launched_rank0():  # torchrun signals every rank
            print(f"\n{signal.Signals(signum).name}: stopping after this step with a "
                  "checkpoint (once more to stop at once)", file=sys.stderr, flush=True)


class Interrupted(UserError):
    prefix = ""  # the line is the message: "interrupted at step N: saved PATH; ..."

    def __init__(self, message, signum):
        super().__init__(message)
        self.exit_code = 128 + signum  # as a shell reports a process ended by the signal


def format_duration(seconds):
    """seconds as H:MM:SS, for the elapsed time and the ETA"""
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class StepClock:
    """Wall time since the start, and the time of optimizer steps after the warm-up (the
    first steps compile and fill caches): for tokens/s, MFU and the ETA."""

    def __init__(self, start_step, max_steps):
        self.start = time.time()
        self.warmup = 10 if max_steps - start_step >= 20 else 0
        self.steps, self.seconds, self.seen = 0, 0.0, 0

    def add(self, dt):
        self.seen += 1
        if self.seen > self.warmup:
            self.steps, self.seconds = self.steps + 1, self.seconds + dt

    def per_step(self, dt):
        return self.seconds / self.steps if self.steps else dt

    def elapsed(self):
        return format_duration(time.time() - self.start)

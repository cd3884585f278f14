"""Output folders of the command-line tools: whose folder it is, one writer at a time, files written whole.

Every tool that writes files (the experiment sweeps, ``real_data``, ``pretraining``, ``advise``) follows the
same rules, checked before any work starts:

* **Ownership.** A tool writes only into a new or empty folder, or into a folder it recognises as its own:
  one whose ``config.json`` names it (``"experiment": <name>`` for a sweep, ``"tool": <name>`` for the
  tools). Any other folder is refused with one line (:class:`CLIError`) and left byte-identical; nothing is
  created in it, not even the lock file.
* **One writer.** While a tool writes, it holds an exclusive ``flock`` on ``<folder>/.lock`` (which records the
  holder: pid, host, start time). A second run on the same folder is refused with one line naming the
  holder. The operating system releases the lock when the holder dies, even by SIGKILL, so a stale lock
  file never blocks the next run. A folder that a run has locked but not yet named (its ``config.json`` not
  written yet) is reported as being written by that run, not as a stranger's folder.
* **Whole files.** :func:`atomic_write` writes to a temporary ``.tmp-*`` file in the same folder, flushes and
  fsyncs it, then renames it over the old file (``os.replace``): a reader sees the old file or the new one,
  never a part. A failed write (a full disk) removes the temporary file and leaves the old file as it was.
* **Modes of the umask.** A file gets the mode a plain ``open()`` would give it (``0666`` less the umask for
  a new file, the old file's mode for a replaced one), not the ``0600`` of a temporary file or of
  safetensors (:func:`write_as_open`); a folder built in a temporary folder and renamed into place gets
  ``0777`` less the umask, its files ``0666`` less the umask (:func:`fresh_modes_under`).
  :func:`append_lines` appends records to a JSON Lines log and, when the write fails, cuts the log back to
  its length before the write, so that no half record is left behind.

Only the standard library here (no torch): :mod:`verification.advise` and :mod:`verification.real_data` use
it too.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import io
import json
import os
import signal
import socket
import stat
import sys
import tempfile
import threading
from pathlib import Path

__all__ = [
    "CLIError",
    "OneLineParser",
    "int_at_least",
    "positive_int",
    "nonnegative_int",
    "SETTINGS_FILE",
    "LOCK_FILE",
    "folder_owner",
    "check_folder",
    "claim_folder",
    "FolderLock",
    "atomic_write",
    "current_umask",
    "fresh_mode",
    "write_as_open",
    "fresh_modes_under",
    "open_log",
    "append_lines",
    "figure_bytes",
    "write_error_message",
    "interrupts_deferred",
]

#: the file that names the tool owning a folder (and holds its settings)
SETTINGS_FILE = "config.json"
#: the lock file of a folder (its content: the holder, for the refusal message)
LOCK_FILE = ".lock"


class CLIError(Exception):
    """Bad input: the CLI prints the one-line message and exits with status 2."""


class OneLineParser(argparse.ArgumentParser):
    """The parser of every command-line module (``prog``: ``python -m verification.<name>``).

    Bad input ends with exactly one line on stderr, ``<prog>: error: <message>``, and exit status 2, whether
    argparse finds it (:meth:`error`) or a later check does (:meth:`refuse`); the usage stays under ``--help``.
    ``--version`` prints the package version.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        from lora_theory import __version__

        self.add_argument("--version", action="version", version=f"%(prog)s {__version__}")

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")

    def refuse(self, message) -> int:
        """Print ``message`` (a :class:`CLIError` or its text) as the one error line; returns the status, 2."""
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        return 2


def int_at_least(low: int, words: str | None = None):
    """An argparse ``type``: an integer ``>= low``; ``words`` says the bound (default ``at least <low>``)."""
    words = words or f"at least {low}"

    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be {words}, got {value}")
        return value

    return parse


#: argparse ``type`` callables: an integer >= 1, an integer >= 0
positive_int = int_at_least(1)
nonnegative_int = int_at_least(0, "non-negative")


# ---------------------------------------------------------------------------------------------- ownership


def folder_owner(folder: Path) -> str | None:
    """The tool or experiment named by ``folder/config.json`` (``"tool"`` or ``"experiment"``), else ``None``
    (no such file, or one that is not a JSON object naming a tool)."""
    try:
        saved = json.loads((Path(folder) / SETTINGS_FILE).read_bytes().decode("utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(saved, dict):
        return None
    for key in ("tool", "experiment"):
        if isinstance(saved.get(key), str):
            return saved[key]
    return None


def _nearest_existing(path: Path) -> Path:
    path = Path(os.path.abspath(path))
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_folder(folder: Path, tool: str, flag: str = "--out") -> bool:
    """Whether ``tool`` may write into ``folder``; reads only, changes nothing.

    Returns ``True`` for a folder of ``tool``'s own (its ``config.json`` names ``tool``), ``False`` for a folder
    that does not exist yet or is empty (a lock file left by a killed run does not count). Raises
    :class:`CLIError` (one line, naming ``flag`` and the folder) for a path that is not a folder, a folder that
    cannot be created, and a non-empty folder of another tool or of nobody.
    """
    folder = Path(folder)
    if not folder.exists():
        base = _nearest_existing(folder)
        if not base.is_dir():
            raise CLIError(f"{flag} {folder}: cannot be created ({base} is not a folder)")
        if not os.access(base, os.W_OK | os.X_OK):
            raise CLIError(f"{flag} {folder}: cannot be created (no write permission in {base})")
        return False
    if not folder.is_dir():
        raise CLIError(f"{flag} {folder}: not a folder")
    try:
        entries = [p.name for p in folder.iterdir() if p.name != LOCK_FILE]
    except OSError as exc:
        raise CLIError(f"{flag} {folder}: cannot be read ({exc.strerror or exc})") from None
    if not entries:
        return False
    owner = folder_owner(folder)
    if owner == tool:
        return True
    if owner is None:
        holder = _lock_holder(folder)
        if holder is not None:  # a run of any tool is setting the folder up: its settings are not written yet
            raise _busy(flag, folder, holder)
        raise CLIError(
            f"{flag} {folder}: not empty and not a {tool} folder (no {SETTINGS_FILE} naming {tool}): "
            f"{tool} writes only into a new or empty folder or one of its own; nothing was changed"
        )
    raise CLIError(
        f"{flag} {folder}: holds the files of {owner!r}, not of {tool!r}: use another folder; nothing was changed"
    )


def claim_folder(
    folder: Path, tool: str, settings: dict | None = None, flag: str = "--out", update: bool = False
) -> Path:
    """Check ``folder`` (:func:`check_folder`), create it, check that a file can be written there, and write
    ``config.json`` naming ``tool`` (with ``settings``) when the folder is new or empty, or with ``update``
    also over the tool's own (the settings of the latest run). Returns the folder.

    For tools that run briefly (``advise``); a tool that runs long (``real_data``, a sweep) also holds
    :class:`FolderLock` while it writes.
    """
    folder = Path(folder)
    own = check_folder(folder, tool, flag)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        if update or not own:
            atomic_write(
                folder / SETTINGS_FILE,
                json.dumps(
                    {"tool": tool, **(settings or {}), "created": _dt.datetime.now().isoformat(timespec="seconds")},
                    indent=1,
                ),
            )
    except OSError as exc:
        raise CLIError(f"{flag} {folder}: cannot write there ({exc.strerror or exc})") from None
    return folder


# ------------------------------------------------------------------------------------------------- lock


class FolderLock:
    """An exclusive ``flock`` on ``folder/.lock`` while a run writes into ``folder`` (a context manager).

    :meth:`acquire` creates the folder if needed, takes the lock without waiting and writes the holder
    (pid, host, start time, what runs) into the lock file; when another process holds it, it raises
    :class:`CLIError` naming the folder and that holder. The lock belongs to the open file: the operating
    system drops it when the process ends in any way (SIGKILL included), so a lock file left behind never
    blocks a later run. POSIX only (``fcntl``).
    """

    def __init__(self, folder: Path, what: str, flag: str = "--out"):
        self.folder, self.what, self.flag = Path(folder), what, flag
        self._file = None

    def acquire(self) -> FolderLock:
        import fcntl

        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            f = open(self.folder / LOCK_FILE, "a+")
        except OSError as exc:
            raise CLIError(f"{self.flag} {self.folder}: cannot write there ({exc.strerror or exc})") from None
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = _describe_holder(f.read())
            f.close()
            raise _busy(self.flag, self.folder, holder) from None
        except OSError as exc:
            f.close()
            raise CLIError(f"{self.flag} {self.folder}: cannot lock it ({exc.strerror or exc})") from None
        try:
            f.seek(0)
            f.truncate()
            f.write(
                json.dumps(
                    {
                        "pid": os.getpid(),
                        "host": socket.gethostname(),
                        "what": self.what,
                        "started": _dt.datetime.now().isoformat(timespec="seconds"),
                    }
                )
                + "\n"
            )
            f.flush()
        except OSError:
            pass  # the holder's description is a courtesy; the lock itself is held
        self._file = f
        return self

    def release(self):
        if self._file is not None:
            import fcntl

            try:
                fcntl.flock(self._file.fileno(), fcntl.LOCK_UN)
            finally:
                self._file.close()
                self._file = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()
        return False


def _busy(flag: str, folder: Path, holder: str) -> CLIError:
    """The refusal of a folder whose lock another process holds."""
    return CLIError(
        f"{flag} {folder}: another run is writing there ({holder}): one run per folder; wait for it to end, "
        f"or use another folder"
    )


def _lock_holder(folder: Path) -> str | None:
    """The description of the process holding ``folder/.lock``, or ``None`` when no process holds it.

    Reads only: the lock file is opened read-only (never created) and probed with a shared ``flock`` taken
    without waiting and dropped at once. A run that has taken the lock but not yet written its
    ``config.json`` (it is checking that the folder is writable) leaves the folder non-empty and unnamed for
    a moment; a second run started then must be told that another run is writing, not that the folder is
    someone else's.
    """
    import fcntl

    try:
        f = open(Path(folder) / LOCK_FILE)
    except OSError:
        return None
    with f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _describe_holder(f.read())
        except OSError:
            return None
        fcntl.flock(f.fileno(), fcntl.LOCK_UN)
        return None


def _describe_holder(text: str) -> str:
    try:
        h = json.loads(text)
        return f"{h['what']}, pid {h['pid']} on {h['host']}, started {h['started']}"
    except (ValueError, KeyError, TypeError):
        return "a process that has not described itself yet"


# ------------------------------------------------------------------------------------------------ writes


def _write_all(f, data: bytes) -> None:
    """Write every byte of ``data`` to the unbuffered binary file ``f`` (a raw write may take only a part).

    Every write of this module goes through here (a test injects a full disk)."""
    view = memoryview(data)
    while view:
        n = f.write(view)
        view = view[n:]


def current_umask() -> int:
    """The process's umask. Read from ``/proc/self/status`` where Linux gives it; elsewhere set and restored
    at once (``os.umask`` can only be read by setting it)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def fresh_mode(folder: bool = False) -> int:
    """The permission bits ``open()`` (``0666``) or ``mkdir()`` (``0777``, ``folder=True``) give a new file
    under the current umask: what a file written through a temporary file (created ``0600``, a temporary
    folder ``0700``) is set to before it is renamed into place."""
    return (0o777 if folder else 0o666) & ~current_umask()


def write_as_open(path, write) -> None:
    """Run ``write(str(path))``, a writer that sets its own mode (safetensors creates ``0600`` files), and leave
    ``path`` with the mode ``open()`` would: the old file's when it replaced one, else :func:`fresh_mode`."""
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode)
    except FileNotFoundError:
        mode = fresh_mode()
    write(str(path))
    os.chmod(path, mode)


def fresh_modes_under(folder) -> None:
    """Give ``folder`` and everything in it the modes of new files and folders (:func:`fresh_mode`): for a folder
    built in a temporary folder (``mkdtemp``: ``0700``) by writers that set their own modes, before it is renamed
    into place."""
    folder = Path(folder)
    os.chmod(folder, fresh_mode(folder=True))
    for path in folder.rglob("*"):
        if not path.is_symlink():
            os.chmod(path, fresh_mode(folder=path.is_dir()))


def _fsync_folder(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: Path, data) -> None:
    """Replace ``path`` by ``data`` (``str``, UTF-8, or ``bytes``) whole, or leave it as it was.

    Written to ``.tmp-*`` in the same folder, flushed and fsynced, then renamed over ``path``, with the mode
    ``open()`` would give it (the old file's, or ``0666`` less the umask for a new one); on any failure
    (``OSError`` such as a full disk, or an interruption) the temporary file is removed and the error raised.
    """
    path = Path(path)
    payload = data.encode("utf-8") if isinstance(data, str) else bytes(data)
    try:  # what open(path, "w") would leave: the old file's mode, or 0666 less the umask for a new file
        mode = stat.S_IMODE(os.stat(path).st_mode)
    except FileNotFoundError:
        mode = fresh_mode()
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=path.suffix)
    try:
        with os.fdopen(fd, "wb", buffering=0) as f:
            os.fchmod(f.fileno(), mode)  # mkstemp creates 0600
            _write_all(f, payload)
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_folder(path.parent)


def open_log(path: Path):
    """``path`` opened for :func:`append_lines` (unbuffered binary append; created if missing)."""
    return open(path, "ab", buffering=0)


def append_lines(log, lines: list[str]) -> None:
    """Append ``lines`` (each without its newline) to ``log`` (from :func:`open_log`), whole or not at all:
    when the write fails (a full disk), the log is cut back to its length before it and the error raised."""
    payload = "".join(line + "\n" for line in lines).encode("utf-8")
    start = os.lseek(log.fileno(), 0, os.SEEK_END)
    try:
        _write_all(log, payload)
    except BaseException:
        try:
            os.ftruncate(log.fileno(), start)  # no half record left behind
        except OSError:
            pass
        raise


def figure_bytes(fig, **savefig_kwargs) -> bytes:
    """A matplotlib figure as PNG bytes (for :func:`atomic_write`)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", **savefig_kwargs)
    return buf.getvalue()


def write_error_message(prog: str, folder, exc: OSError, resume: str | None = None) -> str:
    """The one line that ends a run whose writes into ``folder`` failed (a full disk, a vanished folder)."""
    what = exc.strerror or str(exc)
    line = f"{prog}: error: cannot write into {folder} ({what})"
    if resume:
        line += f"; the files there are whole: free space and finish with {resume}"
    else:
        line += "; the files there are whole: free space and run the command again"
    return line


# ------------------------------------------------------------------------------------------ interruption


class interrupts_deferred:
    """Hold back SIGINT (Ctrl-C) while a block writes its files; raise :class:`KeyboardInterrupt` after it.

    In the main thread only (elsewhere a no-op, since Python delivers signals to the main thread). An
    exception raised by the block itself is not replaced.
    """

    def __enter__(self):
        self._got = []
        self._old = None
        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGINT, lambda signum, frame: self._got.append(signum))
        return self

    def __exit__(self, exc_type, exc, tb):
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)
        if self._got and exc_type is None:
            raise KeyboardInterrupt
        return False

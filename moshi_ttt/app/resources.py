"""Per-session server resources of the app: each run's download folder, and the Stop button's flags.

Both are keyed by Gradio's session hash (a string; None for a caller without a session, such as a raw API call) and
freed when the session ends (`demo.unload`). Gradio-free: the layout turns `gr.Request`s into session hashes.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import hashlib
import logging
import os
import shutil
import sys
import tempfile
import threading
import weakref
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterator
from pathlib import Path

logger = logging.getLogger(__name__)

KEEP_RUNS = 16  # result folders (0.6 MB each with the demo models) kept for callers without a session
# Sessions whose latest folder is kept: a browser's session ends with its tab, a raw API client's never does.
MAX_SESSIONS = 256


@functools.cache
def _malloc_trim():
    """glibc's malloc_trim, or None off Linux/glibc."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc.malloc_trim
    except (OSError, AttributeError):
        return None


def release_memory() -> bool:
    """Gives the memory a finished run freed back to the operating system (glibc's malloc_trim).

    Why: each run scores in one of Gradio's worker threads, and glibc gives each thread its own malloc arena (up to
    8 per core), which keeps what the run freed for later use by that thread. Over many runs in many threads the
    server's resident memory grew from 0.6 to 1.65 GB; trimmed after each run it levels off
    (bench/app_memory.py measures it).

    Returns:
        Whether memory could be trimmed (False off Linux/glibc).
    """
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True


class RunFolders:
    """Each run's downloads in a folder of their own under `root`, deleted once they are no longer needed.

    A session keeps only its latest run's folder (the previous one goes when the next run writes its results, the
    last one when the session ends), whatever other sessions do. Runs without a session keep the `keep` newest of
    their folders. Sessions that never end (raw API calls each open one) are bounded too: beyond `max_sessions`,
    the session whose latest folder is oldest loses it. A folder being written and shown (`writing`) is deleted
    only once its run is done with it.
    """

    def __init__(self, root: str | Path, keep: int = KEEP_RUNS, max_sessions: int = MAX_SESSIONS):
        self.root = Path(root)
        self.keep = keep
        self.max_sessions = max_sessions
        self._by_session: OrderedDict[str, Path] = OrderedDict()  # session -> its latest folder, oldest first
        self._sessionless: OrderedDict[Path, None] = OrderedDict()  # folders of runs without a session, oldest first
        self._in_use: Counter[Path] = Counter()  # folders that runs still write or show (`writing`)
        self._doomed: set[Path] = set()  # folders to delete once no run uses them
        self._lock = threading.Lock()

    def new(self, session: str | None) -> Path:
        """A new, empty folder for a run of `session`; deletes the session's previous one (or, without a session,
        the oldest beyond `keep`).

        Args:
            session: the run's session hash, or None.
        Returns:
            The folder's path.
        """
        with self._lock:
            return self._new(session)

    @contextlib.contextmanager
    def writing(self, session: str | None) -> Iterator[Path]:
        """`new`'s folder, kept until the block ends even if a later run of the session (or the session's end)
        replaces it meanwhile: a run writes its files and yields them to the page inside the block."""
        with self._lock:
            folder = self._new(session)
            self._in_use[folder] += 1
        try:
            yield folder
        finally:
            with self._lock:
                self._in_use[folder] -= 1
                if not self._in_use[folder]:
                    del self._in_use[folder]
                    if folder in self._doomed:
                        self._doomed.discard(folder)
                        shutil.rmtree(folder, ignore_errors=True)

    def end_session(self, session: str | None) -> None:
        """The session's tab was closed or reloaded: its latest folder goes."""
        with self._lock:
            if session is not None:
                self._delete(self._by_session.pop(session, None))

    def _new(self, session: str | None) -> Path:
        self.root.mkdir(parents=True, exist_ok=True)
        folder = Path(tempfile.mkdtemp(prefix="run-", dir=self.root))
        if session is None:
            self._sessionless[folder] = None
            while len(self._sessionless) > self.keep:
                self._delete(self._sessionless.popitem(last=False)[0])
            return folder
        self._delete(self._by_session.pop(session, None))
        self._by_session[session] = folder
        while len(self._by_session) > self.max_sessions:
            self._delete(self._by_session.popitem(last=False)[1])
        return folder

    def _delete(self, folder: Path | None) -> None:
        if folder is None:
            return
        if folder in self._in_use:
            self._doomed.add(folder)
            return
        shutil.rmtree(folder, ignore_errors=True)


class StopRequests:
    """The Stop button's flags, one per browser session: Stop sets its session's flag, the session's run polls it
    between steps and ends with the results of what it scored so far (Gradio's cancel would end the generator
    before it could write them). A session-less caller has no Stop button.

    The flags are empty files in `folder`, so that a run in another process sees them: on ZeroGPU the Run handler
    runs in a worker process forked from the server (spaces' `GPU` decorator), which holds a copy of this object
    made at the fork, while the Stop button's handler runs in the server itself. An in-memory flag would never
    reach the run; a file does (both processes share the disk). Gradio's cancel reaches such a worker too, but
    only by closing the run's generator (spaces sets its worker's stop event, which closes the generator at its
    next update): the partial results would be lost.
    """

    def __init__(self, folder: str | Path | None = None):
        """Args:
        folder: where the flags go (default: a new temporary folder, removed when this object goes, by the
            process that made it only: a forked copy leaves it).
        """
        self.folder = Path(folder) if folder is not None else Path(tempfile.mkdtemp(prefix="moshi-ttt-stop-"))
        self.folder.mkdir(parents=True, exist_ok=True)
        if folder is None:
            weakref.finalize(self, _remove_folder, self.folder, os.getpid())

    def _flag(self, session: str) -> Path:
        # Any session string, one safe file name: the hash comes from the page, and a JSON string may hold a lone
        # surrogate ("\ud800"), which plain UTF-8 refuses to encode.
        return self.folder / hashlib.sha256(session.encode("utf-8", "surrogatepass")).hexdigest()

    def request(self, session: str | None) -> None:
        """The Stop button of `session` (None or "": nothing to stop)."""
        if session:
            self.folder.mkdir(parents=True, exist_ok=True)  # again, in case a /tmp cleaner removed it meanwhile
            self._flag(session).touch()

    def start(self, session: str | None) -> Callable[[], bool]:
        """A new run of `session`: clears its flag.

        Returns:
            The poll for compare_file's `stop_requested` (always False for a session-less run).
        """
        if not session:
            return lambda: False
        flag = self._flag(session)
        flag.unlink(missing_ok=True)
        return flag.exists

    def end_session(self, session: str | None) -> None:
        """The session's tab was closed or reloaded: its flag goes."""
        if session:
            self._flag(session).unlink(missing_ok=True)


def _remove_folder(folder: Path, owner_pid: int) -> None:
    """Removes the flags' folder, in the process that made it only (a forked worker's copy must not remove it)."""
    if os.getpid() == owner_pid:
        shutil.rmtree(folder, ignore_errors=True)

"""broker.json: the broker's own state, its epochs and its runs.

Theory of operation
-------------------
**Epochs.** An epoch is drawn from a broker-wide counter each time a session is
created (or must be told apart from its past, below), so a name never reuses
one.  ``broker.json`` holds a ceiling: epochs are handed out below it, and it
is raised (durably, before any epoch above the old ceiling is used) by a block
of ``EPOCH_BLOCK`` at a time.  A restart starts from the ceiling, so a crash
skips at most one block and never repeats an epoch.

**Runs.** Each time a broker opens a data directory it starts a new *run*,
numbered from 1, and records in ``broker.json``, durably, the run, the machine's
boot id and ``clean: false``; a clean shutdown (every log synced and closed)
sets ``clean: true``.

Runs exist so that subscribers may see a record as soon as it is *written*
(handed to the kernel), before the fsync that makes it durable, while the
append is still acknowledged only after that fsync (``BrokerConfig.deliver``).
The fsync is the slow and jittery part of an append; a reader waiting for it
would see every record a millisecond or more late.  What a written record risks:

* a process crash (``kill -9``, an OOM kill) loses nothing written: the page
  cache holds it and the kernel writes it out, so the records readers saw are
  there after the restart;
* a machine crash (power loss, kernel panic) can lose the newest written
  records.  Readers may have seen records that are gone, and the offsets would
  be reused by different records.  That is the one thing a reader cannot
  detect by itself, so the broker tells it: the session gets a new epoch, and
  every client resuming with the old one is told to reset.

A machine crash shows as a previous run that did not end cleanly, on another
boot id (Linux's ``/proc/sys/kernel/random/boot_id`` is new on every boot; a
container sees its host's).  Its run number goes into ``lost_runs``, for good.
A session records in its ``meta.json`` the run it was written in (durably,
before it first shows an unsynced record in that run); a session whose run is
lost gets a new epoch when it is next opened, however much later.  Sessions
not written during the lost run keep theirs.

Without a boot id (not Linux) a machine crash cannot be told from a process
crash, so records are shown only once durable.  An fsync that fails in a
running broker marks its session *suspect* in memory: what readers saw may
not be on disk, so the session's next actor gives it a new epoch too.
"""

from __future__ import annotations

import json
import logging
import os

from ._files import write_atomic

__all__ = ["BrokerState", "current_boot_id"]

logger = logging.getLogger("broker")

EPOCH_BLOCK = 1000
_BOOT_ID_PATH = "/proc/sys/kernel/random/boot_id"


def current_boot_id() -> str | None:
    """This boot of the machine, or None if the OS does not say.

    ``BROKER_BOOT_ID`` overrides it: a test plays a reboot by changing it.
    """
    forced = os.environ.get("BROKER_BOOT_ID")
    if forced:
        return forced
    try:
        with open(_BOOT_ID_PATH, encoding="ascii") as f:
            return f.read().strip() or None
    except OSError:
        return None


class BrokerState:
    """The contents of ``broker.json`` for one open broker (one run)."""

    def __init__(self, path: str, durable: bool, boot_id: str | None) -> None:
        self.path = path
        self.durable = durable
        self.boot_id = boot_id
        try:
            with open(path, "rb") as f:
                saved = json.load(f)
        except FileNotFoundError:
            saved = {}
        self.epoch_ceiling: int = int(saved.get("epoch_ceiling", 1))
        self._next_epoch = self.epoch_ceiling   # epochs below the ceiling may have been used
        last_run = int(saved.get("run", 0))
        self.lost_runs: frozenset[int] = frozenset(int(r) for r in saved.get("lost_runs", ()))
        last_boot = saved.get("boot_id")
        if (last_run and not saved.get("clean", False) and last_boot is not None
                and last_boot != boot_id):
            # The machine restarted under a running broker that showed records
            # before they were durable: some of them may be gone.  (A run
            # without a boot id showed only durable records.)
            logger.warning("run %d did not shut down cleanly before a machine restart: "
                           "sessions written in it get a new epoch when next opened", last_run)
            self.lost_runs |= {last_run}
        self.run = last_run + 1
        # Sessions whose last fsync failed while their records were shown.
        self.suspect: set[str] = set()
        self._save(clean=False)

    @property
    def deliver_written(self) -> bool:
        """Whether records may be shown before they are durable: only if a
        machine crash can be told from a process crash on the next start."""
        return self.boot_id is not None

    def new_epoch(self) -> int:
        epoch = self._next_epoch
        if epoch >= self.epoch_ceiling:
            self.epoch_ceiling = epoch + EPOCH_BLOCK
            self._save(clean=False)
        self._next_epoch = epoch + 1
        return epoch

    def lost(self, run: object) -> bool:
        """Whether a session written in ``run`` may have lost records its
        readers saw."""
        return isinstance(run, int) and run in self.lost_runs

    def close(self) -> None:
        """Record a clean shutdown: every log is synced and closed."""
        self._save(clean=True)

    def _save(self, clean: bool) -> None:
        write_atomic(self.path, json.dumps({
            "format": 1, "epoch_ceiling": self.epoch_ceiling, "run": self.run,
            "boot_id": self.boot_id, "clean": clean,
            "lost_runs": sorted(self.lost_runs)}).encode(), durable=self.durable)

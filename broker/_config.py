"""Broker configuration: one frozen dataclass, validated when built."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Literal

FsyncMode = Literal["always", "group", "never"]
DeliverMode = Literal["written", "durable"]


@dataclass(frozen=True, slots=True)
class FsyncPolicy:
    """When an append is acknowledged.

    * ``always``: after an fsync that covers it (appends that arrive together
      still share one fsync);
    * ``group`` (default): after a shared fsync, taken ``interval_ms`` after the
      first unsynced append or as soon as ``max_records`` are waiting;
    * ``never``: once written to the OS; a machine crash may lose the newest.
    """

    mode: FsyncMode = "group"
    interval_ms: float = 2.0
    max_records: int = 1000

    def __post_init__(self) -> None:
        if self.mode not in ("always", "group", "never"):
            raise ValueError(f"fsync mode must be always, group or never, not {self.mode!r}")
        if self.interval_ms < 0 or self.max_records < 1:
            raise ValueError("group commit needs interval_ms >= 0 and max_records >= 1")

    @classmethod
    def parse(cls, text: str) -> FsyncPolicy:
        """``always``, ``never``, ``group``, ``group:5ms`` or ``group:5ms:500``."""
        m = re.fullmatch(r"(always|never|group)(?::([\d.]+)ms)?(?::(\d+))?", text.strip())
        if not m:
            raise ValueError(f"bad fsync policy {text!r}: use always, never or group[:Nms[:N]]")
        mode, ms, n = m.groups()
        if mode != "group" and (ms or n):
            raise ValueError(f"only the group policy takes parameters: {text!r}")
        return cls(mode, float(ms) if ms else 2.0, int(n) if n else 1000)  # type: ignore[arg-type]

    @property
    def durable(self) -> bool:
        """Whether anything is fsynced at all (data and metadata alike)."""
        return self.mode != "never"

    def __str__(self) -> str:
        if self.mode != "group":
            return self.mode
        return f"group:{self.interval_ms:g}ms:{self.max_records}"


KIB = 1024
MIB = 1024 * KIB


@dataclass(frozen=True, slots=True)
class BrokerConfig:
    fsync: FsyncPolicy = FsyncPolicy()
    ring_bytes: int = 256 * KIB          # byte budget of each session's ring
    segment_bytes: int = 64 * MIB        # a segment rolls once it would pass this
    index_interval_bytes: int = 4 * KIB  # one sparse index entry per this much log
    retention_bytes: int | None = None   # per session; None keeps everything
    max_record_bytes: int = 16 * MIB     # largest payload accepted
    idle_timeout_s: float = 30.0         # an actor with no work and no readers exits
    mailbox_size: int = 256              # commands queued per actor before senders wait
    max_open_files: int = 256            # broker-wide cap on cached file descriptors
    read_chunk_bytes: int = 256 * KIB    # bytes read from disk per catch-up step
    max_batch_records: int = 1024        # records handed to a reader at once
    max_batch_bytes: int = 1 * MIB       # payload bytes handed to a reader at once
    # When readers see a record: once "written" to the OS (the default; its
    # append is still acked only once durable), or once "durable".  See _run.py.
    deliver: DeliverMode = "written"

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, (int, float)) and not isinstance(v, bool) and v <= 0:
                raise ValueError(f"{f.name} must be positive, not {v}")
        if self.deliver not in ("written", "durable"):
            raise ValueError(f"deliver must be written or durable, not {self.deliver!r}")
        if self.segment_bytes >= 1 << 32:
            raise ValueError("segment_bytes must stay below 4 GiB (index positions are u32)")

    def replace(self, **changes: object) -> BrokerConfig:
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]

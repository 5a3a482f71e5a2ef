"""Errors the broker raises, each with a stable ``code`` for the wire protocols.

Transports map these to HTTP statuses and error frames; the codes are part of
the protocol (docs/protocol.md) and never change meaning.
"""

from __future__ import annotations


class BrokerError(Exception):
    """Base class. ``code`` is stable and machine-readable."""

    code = "internal"


class SessionNotFound(BrokerError):
    code = "session_not_found"

    def __init__(self, name: str) -> None:
        super().__init__(f"session {name!r} does not exist")
        self.name = name


class SessionExists(BrokerError):
    """A create asked for a configuration that differs from the existing one."""

    code = "session_conflict"

    def __init__(self, name: str, detail: str) -> None:
        super().__init__(f"session {name!r} exists with a different {detail}")
        self.name = name


class SessionClosed(BrokerError):
    code = "session_closed"

    def __init__(self, name: str) -> None:
        super().__init__(f"session {name!r} is closed to appends")
        self.name = name


class SessionDeleted(BrokerError):
    """The session a reader was following was deleted (or expired)."""

    code = "session_deleted"

    def __init__(self, name: str) -> None:
        super().__init__(f"session {name!r} was deleted")
        self.name = name


class EpochChanged(BrokerError):
    """The session was deleted and created again: the reader must reset."""

    code = "epoch_changed"

    def __init__(self, name: str, expected: int, actual: int) -> None:
        super().__init__(f"session {name!r} is at epoch {actual}, not {expected}")
        self.name = name
        self.expected = expected
        self.actual = actual


class OffsetTooOld(BrokerError):
    """The offset is below what the session still retains."""

    code = "offset_too_old"

    def __init__(self, offset: int, earliest: int) -> None:
        super().__init__(f"offset {offset} is no longer retained; earliest is {earliest}")
        self.offset = offset
        self.earliest = earliest


class OffsetOutOfRange(BrokerError):
    """The offset is past the end of the session."""

    code = "offset_out_of_range"

    def __init__(self, offset: int, next_offset: int) -> None:
        super().__init__(f"offset {offset} is past the end of the session ({next_offset})")
        self.offset = offset
        self.next_offset = next_offset


class SequenceConflict(BrokerError):
    """An append's writer sequence (Stream-Seq) is not above the last one."""

    code = "sequence_conflict"

    def __init__(self, seq: str, last: str) -> None:
        super().__init__(f"sequence {seq!r} is not greater than the last one, {last!r}")
        self.seq = seq
        self.last = last


class RecordTooLarge(BrokerError, ValueError):
    code = "record_too_large"

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(f"a record of {size} bytes exceeds the limit of {limit}")
        self.size = size
        self.limit = limit


class InvalidSessionName(BrokerError, ValueError):
    code = "invalid_session_name"


class CorruptRecord(BrokerError):
    """A stored record failed its checksum when read."""

    code = "corrupt_record"

    def __init__(self, path: str, position: int, detail: str) -> None:
        super().__init__(f"{path}: corrupt record at byte {position} ({detail})")
        self.path = path
        self.position = position


class StorageError(BrokerError):
    """The disk failed under a session (for example, fsync returned an error)."""

    code = "storage_error"


class BrokerClosed(BrokerError):
    code = "broker_closed"

    def __init__(self) -> None:
        super().__init__("the broker is shut down")

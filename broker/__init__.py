"""broker: a durable session layer for AI chat and agents, on Trio.

The embedding API is small: ``open_broker`` gives a Broker on a data
directory; sessions are created, appended to, read, followed, closed and
deleted through it.  See README.md ("Embedding").
"""

from . import _core
from ._broker import Broker as Broker
from ._broker import Subscription as Subscription
from ._broker import open_broker as open_broker
from ._config import BrokerConfig as BrokerConfig
from ._config import FsyncPolicy as FsyncPolicy
from ._errors import BrokerClosed as BrokerClosed
from ._errors import BrokerError as BrokerError
from ._errors import CorruptRecord as CorruptRecord
from ._errors import EpochChanged as EpochChanged
from ._errors import InvalidSessionName as InvalidSessionName
from ._errors import OffsetOutOfRange as OffsetOutOfRange
from ._errors import OffsetTooOld as OffsetTooOld
from ._errors import RecordTooLarge as RecordTooLarge
from ._errors import SequenceConflict as SequenceConflict
from ._errors import SessionClosed as SessionClosed
from ._errors import SessionDeleted as SessionDeleted
from ._errors import SessionExists as SessionExists
from ._errors import SessionNotFound as SessionNotFound
from ._errors import StorageError as StorageError
from ._session import MESSAGE as MESSAGE
from ._session import NOW as NOW
from ._session import SIGNAL as SIGNAL
from ._session import START as START
from ._session import ProduceResult as ProduceResult
from ._session import Reply as Reply
from ._session import SessionInfo as SessionInfo

Batch = _core.Batch

__version__ = "0.1.0"

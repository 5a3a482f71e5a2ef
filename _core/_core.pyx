# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
# cython: initializedcheck=False
"""The compiled hot path of the session log.

Theory of operation
-------------------
A session's records move through three shapes, and all three are here:

* **Framed bytes on disk.** ``encode`` turns a list of payloads into one bytes
  object of framed records (header, payload, CRC-32 trailer) that the segment
  log writes with a single system call.  ``scan`` walks framed bytes during
  recovery, checking every checksum and offset, and stops at the first record
  that is torn or corrupt.  ``decode`` serves a read from disk: it walks a chunk
  read from a segment and returns the wanted records as a Batch that points into
  that chunk, so no payload is copied.

* **The ring.**  A Ring keeps the newest records of one session in a byte arena
  of fixed size.  Appending past the budget evicts the oldest records, so memory
  per session never exceeds the budget, whatever readers do.  A read copies the
  requested payloads once, into one new bytes object, and returns a Batch.

* **A Batch** is the unit every reader receives: consecutive offsets, their
  timestamps and flags, and payloads that are slices of one shared buffer.
  Iterating a Batch yields memoryview slices, not copies.

Record framing (little-endian), 24-byte header, payload, 4-byte trailer::

    0   u32  payload length
    4   u16  flags (bits 0-3: compression codec, 0 = none; bits 8-13: the
             record's kind, 0 message, 1 signal; the rest reserved)
    6   u16  meta length m (0 for most records)
    8   i64  offset
    16  i64  timestamp, microseconds since the Unix epoch
    24  ...  m bytes of record meta, then len - m bytes of payload
    24+len  u32  CRC-32 (zlib polynomial) of header, meta and payload

Record meta is the record's header, kept apart from the payload the client
appended: a msgpack array ``[publisher, app meta, producer stamp]`` (trailing
nils left out), where the stamp ``[id, epoch, seq]`` marks the last record of
an idempotent producer's append.  Payload readers get the payload alone;
``pack_data`` copies the header verbatim into WebSocket data frames.

Nothing in this module does I/O or knows about Trio; the Python around it does.
"""

cimport cython
from cpython.bytes cimport PyBytes_FromStringAndSize, PyBytes_AS_STRING, PyBytes_GET_SIZE
from libc.stdlib cimport malloc, realloc, free
from libc.string cimport memcpy
from libc.stdint cimport int64_t, uint64_t, uint32_t, uint16_t

cdef extern from "zlib.h" nogil:
    unsigned long zlib_crc32 "crc32"(unsigned long crc, const unsigned char* buf,
                                      unsigned int length)


HEADER_SIZE = 24
TRAILER_SIZE = 4
RECORD_OVERHEAD = 28
MAX_PAYLOAD = 0x7FFFFFFF

# Status codes returned by scan() and decode().
OK = 0            # stopped at the end of the buffer or at a limit, cleanly
PARTIAL = 1       # the buffer ends inside a record: read more, or it is torn
BAD_CHECKSUM = 2  # a record's CRC does not match its bytes
BAD_HEADER = 3    # impossible length or meta length, or an offset out of sequence

cdef enum:
    _HDR = 24
    _OVH = 28


# ---------------------------------------------------------------- byte helpers

cdef inline void _put_u16(unsigned char* p, uint16_t v) noexcept nogil:
    p[0] = v & 0xFF
    p[1] = (v >> 8) & 0xFF

cdef inline void _put_u32(unsigned char* p, uint32_t v) noexcept nogil:
    p[0] = v & 0xFF
    p[1] = (v >> 8) & 0xFF
    p[2] = (v >> 16) & 0xFF
    p[3] = (v >> 24) & 0xFF

cdef inline void _put_i64(unsigned char* p, int64_t v) noexcept nogil:
    cdef uint64_t u = <uint64_t>v
    cdef int i
    for i in range(8):
        p[i] = (u >> (8 * i)) & 0xFF

cdef inline uint16_t _get_u16(const unsigned char* p) noexcept nogil:
    return <uint16_t>(p[0] | (p[1] << 8))

cdef inline uint32_t _get_u32(const unsigned char* p) noexcept nogil:
    return (<uint32_t>p[0] | (<uint32_t>p[1] << 8) | (<uint32_t>p[2] << 16)
            | (<uint32_t>p[3] << 24))

cdef inline int64_t _get_i64(const unsigned char* p) noexcept nogil:
    cdef uint64_t u = 0
    cdef int i
    for i in range(8):
        u |= (<uint64_t>p[i]) << (8 * i)
    return <int64_t>u

cdef inline uint32_t _crc(const unsigned char* p, Py_ssize_t n) noexcept nogil:
    return <uint32_t>zlib_crc32(0, p, <unsigned int>n)


# ---------------------------------------------------------------------- Batch

@cython.final
cdef class Batch:
    """Consecutive records whose payloads are slices of one bytes buffer."""

    def __cinit__(self):
        self._block = NULL
        self._count = 0
        self._first_offset = 0
        self.buffer = b""

    def __dealloc__(self):
        free(self._block)

    cdef int _alloc(self, Py_ssize_t count) except -1:
        cdef Py_ssize_t per = (sizeof(int64_t) + sizeof(Py_ssize_t) + sizeof(uint32_t)
                               + 2 * sizeof(uint16_t))
        cdef char* block
        free(self._block)
        self._block = NULL
        self._count = 0
        if count == 0:
            return 0
        block = <char*>malloc(count * per)
        if block == NULL:
            raise MemoryError()
        self._block = block
        self._ts = <int64_t*>block
        self._start = <Py_ssize_t*>(block + count * sizeof(int64_t))
        self._len = <uint32_t*>(block + count * (sizeof(int64_t) + sizeof(Py_ssize_t)))
        self._flags = <uint16_t*>(block + count * (sizeof(int64_t) + sizeof(Py_ssize_t) + sizeof(uint32_t)))
        self._mlen = self._flags + count
        self._count = count
        return 0

    @staticmethod
    def empty(int64_t next_offset):
        """A batch of no records, positioned at ``next_offset``."""
        cdef Batch b = Batch.__new__(Batch)
        b._first_offset = next_offset
        return b

    @staticmethod
    def from_payloads(int64_t first_offset, int64_t timestamp, payloads, uint16_t flags=0):
        """Build a batch from Python bytes (tests and the pure-Python paths)."""
        cdef list items = [bytes(p) for p in payloads]
        cdef Batch b = Batch.__new__(Batch)
        cdef Py_ssize_t i, pos = 0
        b._first_offset = first_offset
        b.buffer = b"".join(items)
        b._alloc(len(items))
        for i in range(len(items)):
            b._ts[i] = timestamp
            b._start[i] = pos
            b._len[i] = <uint32_t>len(<bytes>items[i])
            b._flags[i] = flags
            b._mlen[i] = 0
            pos += b._len[i]
        return b

    def __len__(self):
        return self._count

    def __bool__(self):
        return self._count > 0

    @property
    def first_offset(self):
        """Offset of the first record (equals next_offset when empty)."""
        return self._first_offset

    @property
    def last_offset(self):
        """Offset of the last record; -1 + first_offset when empty."""
        return self._first_offset + self._count - 1

    @property
    def next_offset(self):
        """The offset a reader asks for after this batch."""
        return self._first_offset + self._count

    @property
    def nbytes(self):
        """Payload bytes in the batch."""
        cdef Py_ssize_t i, total = 0
        for i in range(self._count):
            total += self._len[i]
        return total

    cdef Py_ssize_t _check(self, Py_ssize_t i) except -1:
        if i < 0:
            i += self._count
        if i < 0 or i >= self._count:
            raise IndexError("record index out of range")
        return i

    def offset(self, Py_ssize_t i):
        return self._first_offset + self._check(i)

    def timestamp(self, Py_ssize_t i):
        return self._ts[self._check(i)]

    def flags(self, Py_ssize_t i):
        return self._flags[self._check(i)]

    def payload(self, Py_ssize_t i):
        """The payload of record i, as a memoryview into the shared buffer."""
        i = self._check(i)
        return memoryview(self.buffer)[self._start[i]:self._start[i] + self._len[i]]

    def meta(self, Py_ssize_t i):
        """Record i's meta bytes, or None."""
        i = self._check(i)
        if self._mlen[i] == 0:
            return None
        return self.buffer[self._start[i] - self._mlen[i]:self._start[i]]

    def metas(self):
        """[(offset, meta bytes)] for the records that carry meta."""
        cdef Py_ssize_t i
        return [(self._first_offset + i, self.buffer[self._start[i] - self._mlen[i]:self._start[i]])
                for i in range(self._count) if self._mlen[i]]

    def __iter__(self):
        """Yield (offset, timestamp, payload memoryview) for every record."""
        cdef Py_ssize_t i
        cdef object view = memoryview(self.buffer)
        for i in range(self._count):
            yield (self._first_offset + i, self._ts[i],
                   view[self._start[i]:self._start[i] + self._len[i]])

    def payloads(self):
        """Every payload copied out as bytes (a convenience, not the fast path)."""
        cdef Py_ssize_t i
        cdef const unsigned char* base = <const unsigned char*>PyBytes_AS_STRING(self.buffer)
        return [PyBytes_FromStringAndSize(<char*>base + self._start[i], self._len[i])
                for i in range(self._count)]

    def join(self):
        """All payloads concatenated, as one bytes object."""
        cdef Py_ssize_t i, total = 0, pos = 0
        cdef const unsigned char* base = <const unsigned char*>PyBytes_AS_STRING(self.buffer)
        for i in range(self._count):
            total += self._len[i]
        cdef bytes out = PyBytes_FromStringAndSize(NULL, total)
        cdef char* dst = PyBytes_AS_STRING(out)
        for i in range(self._count):
            memcpy(dst + pos, base + self._start[i], self._len[i])
            pos += self._len[i]
        return out

    def slice(self, Py_ssize_t start, Py_ssize_t stop):
        """Records [start, stop) as a new Batch sharing this buffer."""
        cdef Batch b = Batch.__new__(Batch)
        cdef Py_ssize_t i, n
        start = max(0, min(start, self._count))
        stop = max(start, min(stop, self._count))
        n = stop - start
        b.buffer = self.buffer
        b._first_offset = self._first_offset + start
        b._alloc(n)
        for i in range(n):
            b._ts[i] = self._ts[start + i]
            b._start[i] = self._start[start + i]
            b._len[i] = self._len[start + i]
            b._flags[i] = self._flags[start + i]
            b._mlen[i] = self._mlen[start + i]
        return b

    def __repr__(self):
        return f"<Batch offsets {self._first_offset}..{self._first_offset + self._count - 1} ({self._count} records)>"


# ----------------------------------------------------------------------- Ring

@cython.final
cdef class Ring:
    """The newest records of one session, in a fixed byte budget.

    Payloads sit in a circular arena.  Each payload has a *virtual* start, a
    position that only grows; its physical place is ``vstart % capacity``.  A
    payload never wraps: if it would run past the end of the arena, its virtual
    start skips to the next multiple of the capacity.  The bytes in use are then
    simply ``wvirt - vstart[oldest]``, and a new payload fits when that plus its
    length stays within the capacity.  Records are evicted oldest first.
    """

    def __cinit__(self, Py_ssize_t capacity_bytes, Py_ssize_t max_records=0):
        if capacity_bytes <= 0:
            raise ValueError("capacity_bytes must be positive")
        if max_records <= 0:
            max_records = max(16, capacity_bytes // 16)
        self._capacity = capacity_bytes
        self._slots = max_records
        self._arena = <unsigned char*>malloc(capacity_bytes)
        self._vstart = <int64_t*>malloc(max_records * sizeof(int64_t))
        self._ts = <int64_t*>malloc(max_records * sizeof(int64_t))
        self._len = <uint32_t*>malloc(max_records * sizeof(uint32_t))
        self._flags = <uint16_t*>malloc(max_records * sizeof(uint16_t))
        self._mlen = <uint16_t*>malloc(max_records * sizeof(uint16_t))
        if (self._arena == NULL or self._vstart == NULL or self._ts == NULL
                or self._len == NULL or self._flags == NULL or self._mlen == NULL):
            raise MemoryError()
        self._start_offset = 0
        self._count = 0
        self._head = 0
        self._wvirt = 0

    def __dealloc__(self):
        free(self._arena)
        free(self._vstart)
        free(self._ts)
        free(self._len)
        free(self._flags)
        free(self._mlen)

    @property
    def capacity(self):
        return self._capacity

    @property
    def max_records(self):
        return self._slots

    @property
    def start_offset(self):
        """Oldest offset held (equals next_offset when empty)."""
        return self._start_offset

    @property
    def next_offset(self):
        """The offset the next appended record must carry."""
        return self._start_offset + self._count

    def __len__(self):
        return self._count

    @property
    def nbytes(self):
        """Arena bytes in use, counting the gap a wrap leaves at the end."""
        if self._count == 0:
            return 0
        return self._wvirt - self._vstart[self._head]

    def reset(self, int64_t next_offset):
        """Drop everything; the next record appended must be ``next_offset``."""
        self._count = 0
        self._head = 0
        self._start_offset = next_offset
        self._wvirt = 0

    cdef void _evict_oldest(self):
        self._head = (self._head + 1) % self._slots
        self._count -= 1
        self._start_offset += 1

    cdef int _push(self, int64_t ts, const unsigned char* data, uint32_t length,
                   uint16_t flags, uint16_t mlen):
        # Returns 1 when stored, 0 when the record alone exceeds the budget (the
        # ring is then emptied and positioned after it).
        cdef int64_t v
        cdef Py_ssize_t phys, slot
        if length > self._capacity:
            self._count = 0
            self._head = 0
            self._wvirt = 0
            return 0
        v = self._wvirt
        phys = v % self._capacity
        if phys + length > self._capacity:
            v += self._capacity - phys
            phys = 0
        while self._count > 0 and (
                self._count == self._slots
                or v + length - self._vstart[self._head] > self._capacity):
            self._evict_oldest()
        slot = (self._head + self._count) % self._slots
        self._vstart[slot] = v
        self._ts[slot] = ts
        self._len[slot] = length
        self._flags[slot] = flags
        self._mlen[slot] = mlen
        if length:
            memcpy(self._arena + phys, data, length)
        self._wvirt = v + length
        self._count += 1
        return 1

    def append(self, int64_t offset, int64_t timestamp, payload, uint16_t flags=0):
        """Add one record; ``offset`` must equal next_offset."""
        self.extend(offset, timestamp, (payload,), flags)

    def extend(self, int64_t first_offset, int64_t timestamp, payloads, uint16_t flags=0):
        """Add consecutive records starting at ``first_offset`` (== next_offset)."""
        cdef const unsigned char[:] view
        cdef Py_ssize_t n
        cdef int stored
        cdef int64_t off = first_offset
        if first_offset != self._start_offset + self._count:
            raise ValueError(
                f"ring expects offset {self._start_offset + self._count}, got {first_offset}")
        for p in payloads:
            if isinstance(p, bytes):
                n = PyBytes_GET_SIZE(p)
                stored = self._push(timestamp, <const unsigned char*>PyBytes_AS_STRING(p),
                                    <uint32_t>n, flags, 0)
            else:
                view = p
                n = view.shape[0]
                if n:
                    stored = self._push(timestamp, &view[0], <uint32_t>n, flags, 0)
                else:
                    stored = self._push(timestamp, NULL, 0, flags, 0)
            off += 1
            if not stored:
                self._start_offset = off

    def extend_framed(self, bytes framed):
        """Add the records in ``framed``, as ``encode`` made them (trusted: the
        caller just encoded them), keeping each record's flags and meta."""
        cdef const unsigned char* p = <const unsigned char*>PyBytes_AS_STRING(framed)
        cdef Py_ssize_t pos = 0, n = PyBytes_GET_SIZE(framed)
        cdef uint32_t ln
        cdef int64_t off
        while pos + _OVH <= n:
            ln = _get_u32(p + pos)
            off = _get_i64(p + pos + 8)
            if off != self._start_offset + self._count or pos + _OVH + ln > n:
                raise ValueError(f"ring expects offset {self._start_offset + self._count}, got {off}")
            if not self._push(_get_i64(p + pos + 16), p + pos + _HDR, ln, _get_u16(p + pos + 4),
                              _get_u16(p + pos + 6)):
                self._start_offset = off + 1
            pos += _OVH + ln

    def read(self, int64_t from_offset, int64_t upto_offset=-1,
             Py_ssize_t max_records=1 << 30, Py_ssize_t max_bytes=1 << 30):
        """Records from ``from_offset`` up to (excluding) ``upto_offset``.

        Returns None when ``from_offset`` is older than the ring holds; the caller
        reads those from disk.  Returns an empty Batch at or past the end.  At
        least one record is returned when any is available, even if it alone
        exceeds ``max_bytes``.
        """
        cdef int64_t end = self._start_offset + self._count
        cdef Py_ssize_t i, n, slot, s, phys, total = 0, pos = 0
        cdef Batch b
        cdef char* dst
        if from_offset < self._start_offset:
            return None
        if upto_offset >= 0 and upto_offset < end:
            end = upto_offset
        if from_offset >= end:
            return Batch.empty(from_offset)
        n = min(<int64_t>max_records, end - from_offset)
        if n < 1:
            n = 1
        slot = (self._head + (from_offset - self._start_offset)) % self._slots
        for i in range(n):
            if i > 0 and total + self._len[(slot + i) % self._slots] > max_bytes:
                n = i
                break
            total += self._len[(slot + i) % self._slots]
        b = Batch.__new__(Batch)
        b._first_offset = from_offset
        b.buffer = PyBytes_FromStringAndSize(NULL, total)
        dst = PyBytes_AS_STRING(b.buffer)
        b._alloc(n)
        for i in range(n):
            s = (slot + i) % self._slots
            phys = self._vstart[s] % self._capacity
            memcpy(dst + pos, self._arena + phys, self._len[s])
            b._ts[i] = self._ts[s]
            b._start[i] = pos + self._mlen[s]
            b._len[i] = self._len[s] - self._mlen[s]
            b._flags[i] = self._flags[s]
            b._mlen[i] = self._mlen[s]
            pos += self._len[s]
        return b


# ---------------------------------------------------------------- SparseIndex

@cython.final
cdef class SparseIndex:
    """Offset -> file position for one segment, one entry per ``interval`` bytes.

    Entries hold the offset relative to the segment's base offset and the file
    position, both as u32, so the file form is 8 bytes per entry.  The index is
    derived data: the segment log rebuilds it from the records whenever it is
    missing or does not check out.
    """

    def __cinit__(self, int64_t base_offset, Py_ssize_t interval=4096):
        self._base_offset = base_offset
        self._interval = max(1, interval)
        self._cap = 64
        self._n = 0
        self._last_pos = -1
        self._rel = <uint32_t*>malloc(self._cap * sizeof(uint32_t))
        self._pos = <uint32_t*>malloc(self._cap * sizeof(uint32_t))
        if self._rel == NULL or self._pos == NULL:
            raise MemoryError()

    def __dealloc__(self):
        free(self._rel)
        free(self._pos)

    cdef int _note(self, int64_t offset, int64_t pos) except -1:
        cdef uint32_t* r
        cdef uint32_t* p
        if self._last_pos >= 0 and pos - self._last_pos < self._interval:
            return 0
        if self._n == self._cap:
            r = <uint32_t*>realloc(self._rel, 2 * self._cap * sizeof(uint32_t))
            if r == NULL:
                raise MemoryError()
            self._rel = r
            p = <uint32_t*>realloc(self._pos, 2 * self._cap * sizeof(uint32_t))
            if p == NULL:
                raise MemoryError()
            self._pos = p
            self._cap *= 2
        self._rel[self._n] = <uint32_t>(offset - self._base_offset)
        self._pos[self._n] = <uint32_t>pos
        self._n += 1
        self._last_pos = pos
        return 0

    @property
    def base_offset(self):
        return self._base_offset

    @property
    def interval(self):
        return self._interval

    def __len__(self):
        return self._n

    def note(self, int64_t offset, int64_t pos):
        """Record that ``offset`` starts at ``pos``, if an entry is due."""
        self._note(offset, pos)

    def lookup(self, int64_t offset):
        """File position of the newest entry at or before ``offset`` (0 if none)."""
        cdef Py_ssize_t lo = 0, hi = self._n, mid
        cdef int64_t rel = offset - self._base_offset
        while lo < hi:
            mid = (lo + hi) // 2
            if <int64_t>self._rel[mid] <= rel:
                lo = mid + 1
            else:
                hi = mid
        if lo == 0:
            return 0
        return self._pos[lo - 1]

    def entries(self):
        """[(offset, position), ...], for tests and tools."""
        return [(self._base_offset + self._rel[i], self._pos[i]) for i in range(self._n)]

    def to_bytes(self):
        cdef bytes out = PyBytes_FromStringAndSize(NULL, self._n * 8)
        cdef unsigned char* p = <unsigned char*>PyBytes_AS_STRING(out)
        cdef Py_ssize_t i
        for i in range(self._n):
            _put_u32(p + 8 * i, self._rel[i])
            _put_u32(p + 8 * i + 4, self._pos[i])
        return out

    @staticmethod
    def from_bytes(int64_t base_offset, Py_ssize_t interval, const unsigned char[:] data,
                   int64_t limit_pos):
        """Load an index file; None if it is malformed or points at or past ``limit_pos``."""
        cdef SparseIndex idx = SparseIndex(base_offset, interval)
        cdef Py_ssize_t i, n = data.shape[0] // 8
        cdef uint32_t rel, pos
        if data.shape[0] % 8:
            return None
        for i in range(n):
            rel = _get_u32(&data[8 * i])
            pos = _get_u32(&data[8 * i + 4])
            if pos >= limit_pos:
                return None
            if idx._n and (rel <= idx._rel[idx._n - 1] or pos <= idx._pos[idx._n - 1]):
                return None
            idx._last_pos = -1   # every stored entry is kept, whatever its spacing
            idx._note(base_offset + rel, pos)
        return idx

    def truncate(self, int64_t limit_pos):
        """Drop entries at or past ``limit_pos``."""
        while self._n and self._pos[self._n - 1] >= limit_pos:
            self._n -= 1
        self._last_pos = self._pos[self._n - 1] if self._n else -1


# ------------------------------------------------------------- record framing

def encode(int64_t first_offset, int64_t timestamp, payloads, flags=0,
           SparseIndex index=None, int64_t file_pos=0, dict metas=None):
    """Frame ``payloads`` as consecutive records, in one bytes object.

    ``flags`` is one flags word for every record, or a dict from a record's
    place in ``payloads`` to its flags (0 for the others).  When ``index`` is
    given, entries are noted for records that start at ``file_pos`` plus their
    place in the output.  ``metas`` maps a record's place in ``payloads`` to
    its meta bytes (at most 65,535).
    """
    cdef dict flag_map = flags if isinstance(flags, dict) else None
    cdef uint16_t fl, all_flags = 0 if flag_map is not None else <uint16_t>flags
    cdef list items = list(payloads)
    cdef Py_ssize_t i, n = len(items), total = 0, pos = 0
    cdef Py_ssize_t ln, ml
    cdef bytes m
    cdef const unsigned char[:] view
    cdef unsigned char* dst
    cdef const unsigned char* src
    cdef bytes out
    for i in range(n):
        p = items[i]
        if not isinstance(p, bytes):
            p = bytes(p)
            items[i] = p
        ln = PyBytes_GET_SIZE(p)
        if ln > MAX_PAYLOAD:
            raise ValueError("payload too large for one record")
        total += _OVH + ln
    if metas:
        for i, m in metas.items():
            if not 0 <= i < n or len(m) > 0xFFFF:
                raise ValueError("record meta out of range or longer than 65,535 bytes")
            total += len(m)
    out = PyBytes_FromStringAndSize(NULL, total)
    dst = <unsigned char*>PyBytes_AS_STRING(out)
    for i in range(n):
        p = items[i]
        ln = PyBytes_GET_SIZE(p)
        src = <const unsigned char*>PyBytes_AS_STRING(p)
        if index is not None:
            index._note(first_offset + i, file_pos + pos)
        ml = 0
        if metas and i in metas:
            m = metas[i]
            ml = PyBytes_GET_SIZE(m)
            memcpy(dst + pos + _HDR, PyBytes_AS_STRING(m), ml)
        fl = all_flags
        if flag_map and i in flag_map:
            fl = <uint16_t>flag_map[i]
        _put_u32(dst + pos, <uint32_t>(ml + ln))
        _put_u16(dst + pos + 4, fl)
        _put_u16(dst + pos + 6, <uint16_t>ml)
        _put_i64(dst + pos + 8, first_offset + i)
        _put_i64(dst + pos + 16, timestamp)
        if ln:
            memcpy(dst + pos + _HDR + ml, src, ln)
        _put_u32(dst + pos + _HDR + ml + ln, _crc(dst + pos, _HDR + ml + ln))
        pos += _OVH + ml + ln
    return out


cdef inline int _check_record(const unsigned char* p, Py_ssize_t avail,
                              int64_t expected, Py_ssize_t max_payload,
                              bint verify, Py_ssize_t* size) noexcept nogil:
    # Classify the record at p, with avail bytes available after p.
    cdef uint32_t ln
    if avail < _HDR:
        return 1
    ln = _get_u32(p)
    if ln > max_payload or _get_u16(p + 6) > ln:
        return 3
    if expected >= 0 and _get_i64(p + 8) != expected:
        return 3
    if avail < _OVH + <Py_ssize_t>ln:
        return 1
    if verify and _crc(p, _HDR + ln) != _get_u32(p + _HDR + ln):
        return 2
    size[0] = _OVH + ln
    return 0


def scan(const unsigned char[:] buffer, Py_ssize_t pos, int64_t expected_offset,
         SparseIndex index=None, int64_t file_pos=0, Py_ssize_t max_payload=MAX_PAYLOAD):
    """Validate records from ``pos`` on; return (end_pos, next_offset, status).

    ``end_pos`` is just past the last good record; ``status`` says why the walk
    stopped (OK at the exact end of the buffer).  Each good record is noted in
    ``index`` at ``file_pos + its position``.  ``expected_offset`` -1 accepts
    whatever offset the first record carries.
    """
    cdef Py_ssize_t n = buffer.shape[0], size = 0
    cdef int status = 0
    cdef const unsigned char* base = &buffer[0] if n else NULL
    while pos < n:
        status = _check_record(base + pos, n - pos, expected_offset, max_payload, 1, &size)
        if status:
            break
        if expected_offset < 0:
            expected_offset = _get_i64(base + pos + 8)
        if index is not None:
            index._note(expected_offset, file_pos + pos)
        expected_offset += 1
        pos += size
    return pos, expected_offset, status


def decode(bytes buffer, Py_ssize_t pos, int64_t from_offset, int64_t upto_offset=-1,
           Py_ssize_t max_records=1 << 30, Py_ssize_t max_bytes=1 << 30,
           Py_ssize_t max_payload=MAX_PAYLOAD):
    """Records with offsets in [from_offset, upto_offset) from framed bytes.

    Starts at ``pos`` (a record boundary at or before from_offset, as the index
    gives) and returns (Batch, end_pos, status).  The Batch points into
    ``buffer``.  Records before from_offset are skipped without a checksum
    check; every returned record is verified.  At least one record is returned
    when one is complete, even past ``max_bytes``.
    """
    cdef Py_ssize_t n = PyBytes_GET_SIZE(buffer), size = 0, scan_pos, count = 0, i, ml
    cdef Py_ssize_t total = 0
    cdef const unsigned char* base = <const unsigned char*>PyBytes_AS_STRING(buffer)
    cdef int status = 0
    cdef int64_t off = -1
    cdef Batch b
    # Skip to from_offset.
    while pos < n:
        status = _check_record(base + pos, n - pos, off, max_payload, 0, &size)
        if status:
            return Batch.empty(from_offset), pos, status
        off = _get_i64(base + pos + 8)
        if off >= from_offset:
            break
        pos += size
        off += 1
    if pos >= n:
        return Batch.empty(from_offset), pos, 0
    if off != from_offset:
        return Batch.empty(from_offset), pos, 3
    # Count what we may return.
    scan_pos = pos
    while scan_pos < n and count < max_records:
        if upto_offset >= 0 and off + count >= upto_offset:
            break
        status = _check_record(base + scan_pos, n - scan_pos, off + count, max_payload, 1, &size)
        if status:
            break
        if count and total + size - _OVH > max_bytes:
            break
        total += size - _OVH
        scan_pos += size
        count += 1
    if count == 0:
        return Batch.empty(from_offset), pos, status
    b = Batch.__new__(Batch)
    b.buffer = buffer
    b._first_offset = from_offset
    b._alloc(count)
    for i in range(count):
        size = _get_u32(base + pos)
        ml = _get_u16(base + pos + 6)
        b._ts[i] = _get_i64(base + pos + 16)
        b._start[i] = pos + _HDR + ml
        b._len[i] = <uint32_t>(size - ml)
        b._flags[i] = _get_u16(base + pos + 4)
        b._mlen[i] = <uint16_t>ml
        pos += _OVH + size
    return b, pos, status


# The RFC 6455 framing (FrameParser, build_frame, ...) lives in its own file.
include "_wsframe.pxi"


# ------------------------------------------------ WebSocket data frames (msgpack)
#
# The server's fan-out sends the same records to many subscribers.  pack_data
# turns a Batch into one complete, unmasked binary WebSocket frame whose body
# is a msgpack map (docs/protocol.md, "data"): the caller's ``prefix`` holds
# the map header and every key and value before the records, and this writes
# the records array.  Server frames are unmasked, so the bytes built once go
# to every subscriber at the same offset.

KIND_SHIFT = 8
ALL_KINDS = 0xFFFFFFFFFFFFFFFF

cdef inline Py_ssize_t _mp_uint_size(int64_t v) noexcept nogil:
    if v < 0:
        return 9
    if v < 128:
        return 1
    if v < 256:
        return 2
    if v < 65536:
        return 3
    if v < <int64_t>0x100000000:
        return 5
    return 9

cdef inline Py_ssize_t _put_be(unsigned char* p, uint64_t v, int nbytes) noexcept nogil:
    # Big-endian, as msgpack wants; returns nbytes.
    cdef int i
    for i in range(nbytes):
        p[i] = <unsigned char>(v >> (8 * (nbytes - 1 - i)))
    return nbytes

cdef inline Py_ssize_t _mp_put_int(unsigned char* p, int64_t v) noexcept nogil:
    if v < 0:
        p[0] = 0xd3
        return 1 + _put_be(p + 1, <uint64_t>v, 8)
    if v < 128:
        p[0] = <unsigned char>v
        return 1
    if v < 256:
        p[0] = 0xcc
        return 1 + _put_be(p + 1, <uint64_t>v, 1)
    if v < 65536:
        p[0] = 0xcd
        return 1 + _put_be(p + 1, <uint64_t>v, 2)
    if v < <int64_t>0x100000000:
        p[0] = 0xce
        return 1 + _put_be(p + 1, <uint64_t>v, 4)
    p[0] = 0xcf
    return 1 + _put_be(p + 1, <uint64_t>v, 8)

cdef inline Py_ssize_t _mp_len_size(Py_ssize_t n, Py_ssize_t small) noexcept nogil:
    # Header size of an array (small=16) or bin (small=0) of n elements/bytes.
    if small and n < small:
        return 1
    if not small and n < 256:
        return 2
    if n < 65536:
        return 3
    return 5

cdef inline Py_ssize_t _mp_put_len(unsigned char* p, Py_ssize_t n, bint array) noexcept nogil:
    # An array header (fixarray, array16, array32) or a bin header (bin8/16/32).
    if array and n < 16:
        p[0] = <unsigned char>(0x90 | n)
        return 1
    if not array and n < 256:
        p[0] = 0xc4
        return 1 + _put_be(p + 1, <uint64_t>n, 1)
    if n < 65536:
        p[0] = 0xdc if array else 0xc5
        return 1 + _put_be(p + 1, <uint64_t>n, 2)
    p[0] = 0xdd if array else 0xc6
    return 1 + _put_be(p + 1, <uint64_t>n, 4)

def pack_data(bytes prefix, Batch batch, uint64_t kinds=ALL_KINDS,
              Py_ssize_t limit=1 << 30):
    """A binary WebSocket frame: ``prefix`` then the msgpack array of records.

    Each record is ``[offset, ts, kind, header, payload]``; the header is the
    record's stored meta (already msgpack) or nil.  Only records whose kind
    bit is set in ``kinds`` are included, at most ``limit`` of them.  Returns
    (frame, records included, next offset): the frame is None when no record
    matched, and the next offset is past every record looked at.
    """
    cdef Py_ssize_t i, n = batch._count, count = 0, body, size, pos
    cdef Py_ssize_t stop = n
    cdef unsigned int kind
    cdef const unsigned char* base = <const unsigned char*>PyBytes_AS_STRING(batch.buffer)
    cdef unsigned char* dst
    cdef bytes out
    cdef int64_t off
    body = PyBytes_GET_SIZE(prefix)
    for i in range(n):
        kind = (batch._flags[i] >> KIND_SHIFT) & 0x3F
        if not (kinds >> kind) & 1:
            continue
        if count == limit:
            stop = i
            break
        count += 1
        off = batch._first_offset + i
        body += (1 + _mp_uint_size(off) + _mp_uint_size(batch._ts[i]) + 1
                 + (batch._mlen[i] if batch._mlen[i] else 1)
                 + _mp_len_size(batch._len[i], 0) + batch._len[i])
    if count == 0:
        return None, 0, batch._first_offset + stop
    body += _mp_len_size(count, 16)
    size = body + _ws_out_header_size(body)
    out = PyBytes_FromStringAndSize(NULL, size)
    dst = <unsigned char*>PyBytes_AS_STRING(out)
    pos = _ws_put_header(dst, 0x80 | OP_BINARY, body, 0)     # FIN, binary, unmasked
    memcpy(dst + pos, PyBytes_AS_STRING(prefix), PyBytes_GET_SIZE(prefix))
    pos += PyBytes_GET_SIZE(prefix)
    pos += _mp_put_len(dst + pos, count, 1)
    for i in range(stop):
        kind = (batch._flags[i] >> KIND_SHIFT) & 0x3F
        if not (kinds >> kind) & 1:
            continue
        dst[pos] = 0x95                 # fixarray of 5
        pos += 1
        pos += _mp_put_int(dst + pos, batch._first_offset + i)
        pos += _mp_put_int(dst + pos, batch._ts[i])
        dst[pos] = <unsigned char>kind
        pos += 1
        if batch._mlen[i]:
            memcpy(dst + pos, base + batch._start[i] - batch._mlen[i], batch._mlen[i])
            pos += batch._mlen[i]
        else:
            dst[pos] = 0xc0
            pos += 1
        pos += _mp_put_len(dst + pos, batch._len[i], 0)
        memcpy(dst + pos, base + batch._start[i], batch._len[i])
        pos += batch._len[i]
    assert pos == size
    return out, count, batch._first_offset + stop

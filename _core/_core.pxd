# Declarations for broker._core: the compiled hot path of the session log.
#
# Three types live here. A Batch is a run of consecutive records whose payloads
# share one bytes buffer. A Ring keeps a session's recent records in a fixed
# byte arena. A SparseIndex maps offsets to file positions inside one segment.
# The record framing (encode, scan, decode) is module-level functions in
# _core.pyx; docs/architecture.md gives the byte layout.

from libc.stdint cimport int64_t, uint32_t, uint16_t


cdef class Batch:
    cdef readonly bytes buffer        # every payload of the batch lives in here
    cdef Py_ssize_t _count            # number of records
    cdef int64_t _first_offset        # offset of record 0; offsets are consecutive
    cdef int64_t* _ts                 # per record: timestamp, microseconds since the epoch
    cdef Py_ssize_t* _start           # per record: payload start inside buffer
    cdef uint32_t* _len               # per record: payload length in bytes
    cdef uint16_t* _flags             # per record: flags word from the record header
    cdef uint16_t* _mlen              # per record: bytes of record meta just before the payload
    cdef void* _block                 # the one malloc block holding the five arrays

    cdef int _alloc(self, Py_ssize_t count) except -1
    cdef Py_ssize_t _check(self, Py_ssize_t i) except -1


cdef class Ring:
    cdef unsigned char* _arena        # payload bytes, used as a circle
    cdef Py_ssize_t _capacity         # arena size in bytes (the byte budget)
    cdef Py_ssize_t _slots            # most records held at once (metadata slots)
    cdef int64_t* _vstart             # per slot: virtual start of the payload (see _place)
    cdef int64_t* _ts                 # per slot: timestamp
    cdef uint32_t* _len               # per slot: payload length
    cdef uint16_t* _flags             # per slot: flags
    cdef uint16_t* _mlen              # per slot: leading bytes of the stored run that are record meta
    cdef int64_t _start_offset        # offset of the oldest record held
    cdef Py_ssize_t _count            # records held; offsets are start .. start+count-1
    cdef Py_ssize_t _head             # slot of the oldest record
    cdef int64_t _wvirt               # virtual position where the next payload goes

    cdef void _evict_oldest(self)
    cdef int _push(self, int64_t ts, const unsigned char* data, uint32_t length,
                   uint16_t flags, uint16_t mlen)


cdef class SparseIndex:
    cdef int64_t _base_offset         # base offset of the segment this indexes
    cdef Py_ssize_t _interval         # bytes of log between two entries
    cdef uint32_t* _rel               # per entry: offset - base_offset
    cdef uint32_t* _pos               # per entry: file position of that record
    cdef Py_ssize_t _n                # entries in use
    cdef Py_ssize_t _cap              # entries allocated
    cdef int64_t _last_pos            # position of the newest entry, -1 when empty

    cdef int _note(self, int64_t offset, int64_t pos) except -1

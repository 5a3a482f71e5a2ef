# WebSocket framing (RFC 6455), compiled and sans-IO.  Included by _core.pyx.
#
# Theory of operation
# -------------------
# The server's data path reads 64 KiB at a time and every read holds hundreds
# of small frames, so the cost that matters is per frame, not per byte.
# ``FrameParser.feed`` walks the bytes it is given in place: a frame that lies
# whole inside the read becomes its payload ``bytes`` in one pass (the unmasking
# XOR *is* the copy), and only the parts of a frame cut by the end of a read are
# kept, already unmasked, until the rest arrives:
#
# * a header cut short (at most 13 bytes) waits in ``_hdr``;
# * the payload of a data frame, and every fragment of a fragmented message,
#   accumulate in one growing buffer ``_acc``, which becomes the message's bytes
#   when its final fragment ends: fragments are joined once, and each byte is
#   copied twice at most (into ``_acc``, then out), however many reads it takes;
# * a control frame's payload (at most 125 bytes) waits in ``_ctl``, so a ping
#   between two fragments leaves the message being assembled alone.
#
# Every framing rule is checked on the header, before any payload is kept: a
# peer that announces a frame beyond ``max_message`` is refused (1009) the
# moment its length is known, so it cannot make us hold the bytes first.  The
# first violation is kept in ``error``; the messages completed before it are
# still returned, and every later ``feed`` raises it.  Payloads are not looked
# into: TEXT is not checked for UTF-8, and a close frame's payload is checked
# by ``parse_close`` when the layer above reads it.
#
# Frame layout (network byte order)::
#
#     byte 0   FIN | RSV1 RSV2 RSV3 | opcode (4 bits)
#     byte 1   MASK | length (7 bits): 0-125, or 126 -> u16 follows, 127 -> u64
#     [2 or 8 bytes of extended length] [4-byte masking key if MASK] payload
#
# The builders go the other way: server frames are unmasked, so one frame (or
# one batch of frames, ``build_frames``) is built once and sent to every
# subscriber; ``frame_header`` lets a caller send a header and a payload it
# already holds without joining them.

from cpython.buffer cimport PyObject_GetBuffer, PyBuffer_Release, PyBUF_SIMPLE
from libc.string cimport memcpy
from libc.stdint cimport uint64_t

OP_CONTINUATION = 0
OP_TEXT = 1
OP_BINARY = 2
OP_CLOSE = 8
OP_PING = 9
OP_PONG = 10

cdef enum:
    _WS_MAX_HEADER = 14       # 2 + 8-byte length + 4-byte key
    _WS_MAX_CONTROL = 125
    _WS_ACC_MIN = 1024        # first allocation of the message buffer
    _WS_ACC_KEEP = 65536      # a larger message buffer is freed once its message is out


class WsProtocolError(Exception):
    """The peer broke RFC 6455.  ``code`` is the close code to answer with."""

    def __init__(self, code, reason):
        # Both in args, so the error pickles and its repr shows the code.
        Exception.__init__(self, code, reason)
        self.code = code
        self.reason = reason

    def __str__(self):
        return self.reason


# ---------------------------------------------------------------- byte helpers

cdef inline void _ws_xor(unsigned char* dst, const unsigned char* src, Py_ssize_t n,
                         const unsigned char* key, Py_ssize_t phase) noexcept nogil:
    # dst[i] = src[i] ^ key[(phase + i) % 4], eight bytes at a time.  dst may be
    # src.  memcpy to and from a local word is how C spells an unaligned load;
    # the compiler makes it one instruction.  The key is laid out in memory
    # order, so the result does not depend on the machine's endianness.
    cdef unsigned char k[8]
    cdef uint64_t k8 = 0, w0 = 0, w1 = 0     # zeroed only to quiet Cython's flow analysis
    cdef Py_ssize_t i
    for i in range(8):
        k[i] = key[(phase + i) & 3]
    memcpy(&k8, k, 8)
    i = 0
    while i + 16 <= n:
        memcpy(&w0, src + i, 8)
        memcpy(&w1, src + i + 8, 8)
        w0 ^= k8
        w1 ^= k8
        memcpy(dst + i, &w0, 8)
        memcpy(dst + i + 8, &w1, 8)
        i += 16
    if i + 8 <= n:
        memcpy(&w0, src + i, 8)
        w0 ^= k8
        memcpy(dst + i, &w0, 8)
        i += 8
    while i < n:
        dst[i] = src[i] ^ k[i & 7]     # k repeats every 4 bytes, so i & 7 keeps the phase
        i += 1


cdef inline Py_ssize_t _ws_header_size(unsigned char b1) noexcept nogil:
    # The whole header's size, known from its second byte.
    cdef Py_ssize_t h = 2
    if (b1 & 0x7F) == 126:
        h = 4
    elif (b1 & 0x7F) == 127:
        h = 10
    if b1 & 0x80:
        h += 4
    return h


cdef inline Py_ssize_t _ws_out_header_size(Py_ssize_t n) noexcept nogil:
    if n < 126:
        return 2
    if n < 65536:
        return 4
    return 10


cdef inline Py_ssize_t _ws_put_header(unsigned char* h, int b0, Py_ssize_t n,
                                      int mask_bit) noexcept nogil:
    # The shortest length encoding, as the RFC requires; returns the bytes written.
    cdef int i
    h[0] = <unsigned char>b0
    if n < 126:
        h[1] = <unsigned char>(mask_bit | n)
        return 2
    if n < 65536:
        h[1] = <unsigned char>(mask_bit | 126)
        h[2] = (n >> 8) & 0xFF
        h[3] = n & 0xFF
        return 4
    h[1] = <unsigned char>(mask_bit | 127)
    for i in range(8):
        h[2 + i] = (<uint64_t>n >> (56 - 8 * i)) & 0xFF
    return 10


cdef inline int _ws_check_out(int opcode, bint fin, Py_ssize_t n) except -1:
    # What we send must be what we would accept: a local misuse is a ValueError.
    if not (0 <= opcode <= 2 or 8 <= opcode <= 10):
        raise ValueError(f"unknown WebSocket opcode {opcode}")
    if n < 0:
        raise ValueError("negative frame length")
    if opcode >= 8 and (n > _WS_MAX_CONTROL or not fin):
        raise ValueError("a control frame is a single frame of at most 125 bytes")
    return 0


cdef inline bint _ws_close_code_ok(int code) noexcept nogil:
    # Codes a peer may put on the wire (RFC 6455 7.4 and the IANA registry):
    # 1004-1006 and 1015 are reserved or local-only, 1016-2999 unassigned.
    return (1000 <= code <= 1003 or 1007 <= code <= 1014 or 3000 <= code <= 4999)


# ----------------------------------------------------------------- FrameParser

@cython.final
cdef class FrameParser:
    """Bytes from one peer in, whole messages and control frames out.

    ``client_side`` False (we are the server): every frame must be masked;
    True: none may be.  Data messages (the sum of their fragments) above
    ``max_message`` bytes are refused with close code 1009.
    """

    cdef bint _client_side            # we are the client: the peer's frames are unmasked
    cdef Py_ssize_t _max_message      # largest data message accepted, fragments summed
    cdef object _error                # the WsProtocolError that broke the stream, or None
    cdef unsigned char _hdr[_WS_MAX_HEADER]   # a header cut by a read, as far as it came
    cdef Py_ssize_t _hdr_len          # bytes in _hdr; 0 when not in a split header
    cdef bint _in_payload             # a header was read and its payload is not all consumed
    cdef int _op                      # opcode of the current frame
    cdef bint _fin                    # FIN bit of the current frame
    cdef bint _masked                 # the current frame carries a key
    cdef unsigned char _key[4]        # its masking key
    cdef Py_ssize_t _done             # payload bytes of the current frame consumed: the mask phase
    cdef Py_ssize_t _remaining        # payload bytes of the current frame still to come
    cdef int _msg_op                  # TEXT or BINARY while a data message is in progress, else 0
    cdef unsigned char* _acc          # unmasked payload of the data message so far
    cdef Py_ssize_t _acc_len          # bytes in _acc; never above _max_message
    cdef Py_ssize_t _acc_cap          # bytes allocated at _acc
    cdef unsigned char _ctl[_WS_MAX_CONTROL]  # unmasked payload of a control frame cut by a read
    cdef Py_ssize_t _ctl_len          # bytes in _ctl

    def __init__(self, bint client_side=False, Py_ssize_t max_message=1 << 20):
        # __init__, not __cinit__, so the signature is visible to stubtest and
        # help(); the C fields start zeroed either way.
        if max_message < 0:
            raise ValueError("max_message must not be negative")
        free(self._acc)
        self._acc = NULL
        self._acc_len = self._acc_cap = self._hdr_len = self._ctl_len = 0
        self._in_payload = False
        self._msg_op = 0
        self._client_side = client_side
        self._max_message = max_message
        self._error = None

    def __dealloc__(self):
        free(self._acc)

    @property
    def error(self):
        """The WsProtocolError that ended the stream, or None."""
        return self._error

    @property
    def buffered(self):
        """Bytes held until the rest of their frame or message arrives."""
        return self._hdr_len + self._acc_len + self._ctl_len

    def feed(self, data):
        """Parse ``data``; return the messages completed, as (opcode, bytes), in order.

        On a violation, the messages before it are still returned and ``error``
        is set; every later call raises that error.
        """
        cdef Py_buffer view
        cdef list out = []
        if self._error is not None:
            # A fresh traceback each time, or re-raising would grow the old one.
            raise self._error.with_traceback(None)
        if type(data) is bytes:
            self._run(<const unsigned char*>PyBytes_AS_STRING(data), PyBytes_GET_SIZE(data), out)
        else:
            PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
            try:
                self._run(<const unsigned char*>view.buf, view.len, out)
            finally:
                PyBuffer_Release(&view)
        return out

    cdef int _fail(self, int code, str reason) except -1:
        # The stream is dead: keep the error, drop what was held for it.
        self._error = WsProtocolError(code, reason)
        free(self._acc)
        self._acc = NULL
        self._acc_len = self._acc_cap = self._hdr_len = self._ctl_len = 0
        self._in_payload = False
        return 1

    cdef int _check_first(self, unsigned char b0, unsigned char b1) except -1:
        # The rules that the first two bytes decide; 1 (and error set) if broken.
        cdef int op = b0 & 0x0F
        if b0 & 0x70:
            return self._fail(1002, "reserved bits set, but no extension was negotiated")
        if op >= 8:
            if op > 10:
                return self._fail(1002, f"unknown opcode {op}")
            if not b0 & 0x80:
                return self._fail(1002, "fragmented control frame")
            if (b1 & 0x7F) > _WS_MAX_CONTROL:
                return self._fail(1002, "control frame payload over 125 bytes")
        elif op > 2:
            return self._fail(1002, f"unknown opcode {op}")
        elif op == 0 and self._msg_op == 0:
            return self._fail(1002, "continuation frame with no message in progress")
        elif op != 0 and self._msg_op != 0:
            return self._fail(1002, "new data frame inside a fragmented message")
        if (b1 & 0x80) and self._client_side:
            return self._fail(1002, "masked frame from the server")
        if not (b1 & 0x80) and not self._client_side:
            return self._fail(1002, "unmasked frame from the client")
        return 0

    cdef int _start_frame(self, const unsigned char* h) except -1:
        # h holds a whole header (_ws_header_size(h[1]) bytes).
        cdef unsigned char b1 = h[1]
        cdef uint64_t n = b1 & 0x7F
        cdef Py_ssize_t p = 2
        cdef int i
        if self._check_first(h[0], b1):
            return 1
        if n == 126:
            n = (<uint64_t>h[2] << 8) | h[3]
            p = 4
            if n < 126:
                return self._fail(1002, "length not in its shortest form")
        elif n == 127:
            n = 0
            for i in range(8):
                n = (n << 8) | h[2 + i]
            p = 10
            if n >> 63:
                return self._fail(1002, "64-bit length with the top bit set")
            if n < 65536:
                return self._fail(1002, "length not in its shortest form")
        self._op = h[0] & 0x0F
        if self._op < 8:
            if n > <uint64_t>(self._max_message - self._acc_len):
                return self._fail(1009, f"message over {self._max_message} bytes")
            if self._op:
                self._msg_op = self._op
        self._fin = (h[0] & 0x80) != 0
        self._masked = (b1 & 0x80) != 0
        if self._masked:
            memcpy(self._key, h + p, 4)
        self._remaining = <Py_ssize_t>n
        self._done = 0
        self._in_payload = True
        return 0

    cdef inline void _unmask(self, unsigned char* dst, const unsigned char* src,
                             Py_ssize_t n) noexcept:
        if self._masked:
            _ws_xor(dst, src, n, self._key, self._done)
        elif n:
            memcpy(dst, src, n)
        self._done += n

    cdef int _keep(self, const unsigned char* src, Py_ssize_t n) except -1:
        # Hold n more payload bytes of the current frame, unmasked.
        cdef Py_ssize_t need, cap
        cdef unsigned char* a
        if self._op >= 8:
            self._unmask(self._ctl + self._ctl_len, src, n)
            self._ctl_len += n
            return 0
        need = self._acc_len + n
        if need > self._acc_cap:
            # Grow geometrically (a message of many small fragments must not
            # realloc per fragment), but only as bytes arrive: a header's length
            # is the peer's claim, and we hold at most twice what it has sent.
            cap = max(2 * self._acc_cap, <Py_ssize_t>_WS_ACC_MIN)
            cap = max(need, min(cap, self._max_message))
            a = <unsigned char*>realloc(self._acc, cap)
            if a == NULL:
                raise MemoryError()
            self._acc = a
            self._acc_cap = cap
        self._unmask(self._acc + self._acc_len, src, n)
        self._acc_len = need
        return 0

    cdef bytes _take(self, const unsigned char* src, Py_ssize_t n):
        cdef bytes b = PyBytes_FromStringAndSize(NULL, n)
        self._unmask(<unsigned char*>PyBytes_AS_STRING(b), src, n)
        return b

    cdef int _finish(self, const unsigned char* src, Py_ssize_t n, list out) except -1:
        # The current frame's last n payload bytes are at src.
        cdef bytes payload
        if self._op >= 8:
            if self._ctl_len == 0:
                payload = self._take(src, n)
            else:
                self._keep(src, n)
                payload = PyBytes_FromStringAndSize(<char*>self._ctl, self._ctl_len)
                self._ctl_len = 0
            out.append((self._op, payload))
        elif self._fin and self._op and self._acc_len == 0:
            # The common case: a whole message in one frame, copied once.
            self._msg_op = 0
            out.append((self._op, self._take(src, n)))
        else:
            self._keep(src, n)
            if self._fin:
                payload = PyBytes_FromStringAndSize(<char*>self._acc, self._acc_len)
                out.append((self._msg_op, payload))
                self._msg_op = 0
                self._acc_len = 0
                if self._acc_cap > _WS_ACC_KEEP:
                    # An idle connection should not keep its biggest message's buffer.
                    free(self._acc)
                    self._acc = NULL
                    self._acc_cap = 0
        return 0

    cdef int _run(self, const unsigned char* p, Py_ssize_t n, list out) except -1:
        # Returns 0 when all of p is consumed, 1 on a protocol error.
        cdef Py_ssize_t pos = 0, take, hsize
        while True:
            if self._in_payload:
                take = n - pos
                if take < self._remaining:
                    self._keep(p + pos, take)
                    self._remaining -= take
                    return 0
                take = self._remaining
                self._in_payload = False
                self._finish(p + pos, take, out)
                pos += take
                continue
            if self._hdr_len == 0 and n - pos >= 2:
                hsize = _ws_header_size(p[pos + 1])
                if n - pos >= hsize:
                    if self._start_frame(p + pos):
                        return 1
                    pos += hsize
                    continue
            if pos == n:
                return 0
            # The header is cut by the end of the read: gather it in _hdr, and
            # apply the first two bytes' rules as soon as they are here.
            if self._hdr_len < 2:
                take = min(2 - self._hdr_len, n - pos)
                memcpy(self._hdr + self._hdr_len, p + pos, take)
                self._hdr_len += take
                pos += take
                if self._hdr_len < 2:
                    return 0
                if self._check_first(self._hdr[0], self._hdr[1]):
                    return 1
            hsize = _ws_header_size(self._hdr[1])
            take = min(hsize - self._hdr_len, n - pos)
            memcpy(self._hdr + self._hdr_len, p + pos, take)
            self._hdr_len += take
            pos += take
            if self._hdr_len < hsize:
                return 0
            self._hdr_len = 0
            if self._start_frame(self._hdr):
                return 1


# -------------------------------------------------------------------- builders

cdef bytes _ws_build(int opcode, object payload, bint fin, object mask):
    cdef Py_buffer pv, kv
    cdef bint have_key = False
    cdef Py_ssize_t n, h
    cdef unsigned char* dst
    cdef bytes out
    PyObject_GetBuffer(payload, &pv, PyBUF_SIMPLE)
    try:
        n = pv.len
        _ws_check_out(opcode, fin, n)
        if mask is not None:
            PyObject_GetBuffer(mask, &kv, PyBUF_SIMPLE)
            have_key = True
            if kv.len != 4:
                raise ValueError("a masking key is 4 bytes")
        out = PyBytes_FromStringAndSize(NULL, _ws_out_header_size(n) + (4 if have_key else 0) + n)
        dst = <unsigned char*>PyBytes_AS_STRING(out)
        h = _ws_put_header(dst, (0x80 if fin else 0) | opcode, n, 0x80 if have_key else 0)
        if have_key:
            memcpy(dst + h, kv.buf, 4)
            _ws_xor(dst + h + 4, <const unsigned char*>pv.buf, n,
                    <const unsigned char*>kv.buf, 0)
        elif n:
            memcpy(dst + h, pv.buf, n)
        return out
    finally:
        PyBuffer_Release(&pv)
        if have_key:
            PyBuffer_Release(&kv)


def build_frame(int opcode, payload, bint fin=True, mask=None):
    """One frame: unmasked (server to client) or, given a 4-byte ``mask``, masked."""
    return _ws_build(opcode, payload, fin, mask)


def build_frames(int opcode, payloads):
    """Unmasked single-frame messages, all in one bytes object (one send)."""
    cdef list items = payloads if type(payloads) is list else list(payloads)
    cdef Py_ssize_t i, n, count = len(items), total = 0, pos = 0
    cdef unsigned char* dst
    cdef bytes out
    cdef bint copied = items is not payloads
    for i in range(count):
        p = items[i]
        if type(p) is not bytes:
            # Rare (the data path hands us bytes); a copy keeps the loops below simple.
            if not copied:
                items = list(items)
                copied = True
            p = bytes(p)
            items[i] = p
        n = PyBytes_GET_SIZE(p)
        _ws_check_out(opcode, True, n)
        total += _ws_out_header_size(n) + n
    out = PyBytes_FromStringAndSize(NULL, total)
    dst = <unsigned char*>PyBytes_AS_STRING(out)
    for i in range(count):
        p = items[i]
        n = PyBytes_GET_SIZE(p)
        pos += _ws_put_header(dst + pos, 0x80 | opcode, n, 0)
        memcpy(dst + pos, PyBytes_AS_STRING(p), n)
        pos += n
    return out


def frame_header(int opcode, Py_ssize_t length, bint fin=True):
    """The unmasked header of a frame of ``length`` bytes, for header + payload sends."""
    cdef unsigned char h[_WS_MAX_HEADER]
    _ws_check_out(opcode, fin, length)
    return PyBytes_FromStringAndSize(
        <char*>h, _ws_put_header(h, (0x80 if fin else 0) | opcode, length, 0))


def mask_payload(data, key):
    """``data`` XOR the 4-byte ``key``, repeated (masking and unmasking alike)."""
    cdef Py_buffer dv, kv
    cdef bytes out
    PyObject_GetBuffer(data, &dv, PyBUF_SIMPLE)
    try:
        PyObject_GetBuffer(key, &kv, PyBUF_SIMPLE)
        try:
            if kv.len != 4:
                raise ValueError("a masking key is 4 bytes")
            out = PyBytes_FromStringAndSize(NULL, dv.len)
            _ws_xor(<unsigned char*>PyBytes_AS_STRING(out), <const unsigned char*>dv.buf,
                    dv.len, <const unsigned char*>kv.buf, 0)
            return out
        finally:
            PyBuffer_Release(&kv)
    finally:
        PyBuffer_Release(&dv)


def close_payload(int code, str reason=""):
    """A close frame's payload: ``code`` (u16, big-endian) and the UTF-8 ``reason``.

    The reason is cut to the 123 bytes that fit, at a character boundary.
    """
    cdef bytes r
    cdef Py_ssize_t cut
    if not _ws_close_code_ok(code):
        raise ValueError(f"{code} is not a close code that may be sent")
    r = reason.encode("utf-8", "replace")
    if PyBytes_GET_SIZE(r) > _WS_MAX_CONTROL - 2:
        cut = _WS_MAX_CONTROL - 2
        while cut > 0 and (r[cut] & 0xC0) == 0x80:   # r[cut] continues a character
            cut -= 1
        r = r[:cut]
    return bytes(((code >> 8) & 0xFF, code & 0xFF)) + r


def parse_close(payload):
    """A close frame's payload as (code, reason); (1005, "") when it is empty."""
    cdef bytes b = bytes(payload)
    cdef int code
    if not b:
        return 1005, ""
    if PyBytes_GET_SIZE(b) == 1:
        raise WsProtocolError(1002, "close frame with a 1-byte payload")
    code = (b[0] << 8) | b[1]
    if not _ws_close_code_ok(code):
        raise WsProtocolError(1002, f"invalid close code {code}")
    try:
        return code, b[2:].decode("utf-8")
    except UnicodeDecodeError:
        raise WsProtocolError(1002, "close reason is not UTF-8") from None

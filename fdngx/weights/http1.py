"""An incremental HTTP/1.1 response reader for the batch scrape loop (fdngx.weights.batch): bytes in as they
arrive, a status and a body out, reading what http.client reads and refusing what it refuses.

Framing: Content-Length, chunked (extensions and trailers allowed), or until the connection closes (HTTP/1.0,
or no length); interim 1xx answers are skipped (at most MAX_INTERIM of them, each head read afresh); 204 and
304 have no body. Like http.client's read1, a body cut short by the close is returned as it is.

`max_bytes` bounds what one answer may make the loop read and parse: every byte on the wire after the final
answer's head counts as it arrives (body, chunk size lines, CRLFs, trailers), and so do the interim answers;
past it the answer is `oversize`. A replica sending 1-byte chunks or an endless trailer stops there.
"""

from __future__ import annotations

MAX_LINE = 65536  # http.client's limit for the status line and each header line
MAX_HEADERS = 100  # http.client's limit
MAX_INTERIM = 256  # interim (1xx) answers before the real one: http.client skips any number; an engine sends 0 or 1


class Closed(Exception):
    """The peer closed before a response could be read (http.client: RemoteDisconnected, BadStatusLine)."""


class Refused(Exception):
    """A response http.client would refuse (or should: past MAX_INTERIM, a negative chunk size); the text names
    what."""


class Response:
    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.buf = bytearray()
        self.data = bytearray()  # the body so far
        self.wire = 0  # bytes counted against max_bytes (see the module's text)
        self.status = 0
        self.interim = 0  # 1xx answers skipped
        self.will_close = False
        self.head_done = False
        self.chunked = False
        self.length: int | None = None  # Content-Length
        self.chunk = -1  # chunked: bytes left in the current chunk; -1 a size line next; -2 trailers next
        self.oversize = False
        self._scan = 0  # where the search for the head's end resumes (no rescan of a head arriving in pieces)

    @property
    def started(self) -> bool:
        """Any byte of a response arrived (a kept-alive connection that fails before is worth one retry)."""
        return self.head_done or bool(self.buf) or self.interim > 0

    @property
    def size(self) -> int:
        return len(self.data)

    def body(self) -> bytes:
        return bytes(self.data)

    def feed(self, data: bytes) -> bool:
        """Take bytes; True once the response is complete (or `oversize`). Raises Closed or Refused."""
        if not self.head_done:
            self.buf += data
            while True:  # a loop, not a recursion: any number of interim answers may come in one recv
                end = self.buf.find(b"\r\n\r\n", self._scan)
                if end < 0:
                    if len(self.buf) > 2 * MAX_LINE:
                        raise Refused(f"LineTooLong: got more than {MAX_LINE} bytes when reading header line")
                    self._scan = max(0, len(self.buf) - 3)
                    return False
                head = bytes(self.buf[:end])
                del self.buf[: end + 4]
                self._scan = 0
                self._head(head)
                if not 100 <= self.status < 200:
                    break
                # An interim answer (100 Continue, 103 Early Hints): the real one follows.
                self.status = 0
                self.interim += 1
                self.wire += end + 4
                if self.interim > MAX_INTERIM:
                    raise Refused(f"HTTPException: more than {MAX_INTERIM} interim (1xx) answers")
                if self.wire > self.max_bytes:
                    self.oversize = True
                    return True
            data, self.buf = bytes(self.buf), bytearray()
            self.head_done = True
            if self.status in (204, 304) or (not self.chunked and self.length == 0):
                return True
        self.wire += len(data)
        if self.wire > self.max_bytes:
            self.oversize = True
            return True
        return self._chunks(data) if self.chunked else self._plain(data)

    def eof(self) -> bool:
        """The peer closed: True if that ends the response (a body delimited by the close); else Closed."""
        if self.head_done and not self.chunked:
            self.will_close = True
            return True
        raise Closed

    def _plain(self, data: bytes) -> bool:
        self.data += data
        if self.length is not None and len(self.data) >= self.length:
            del self.data[self.length:]  # bytes past the length are not this response's
            return True
        return False

    def _chunks(self, data: bytes) -> bool:
        buf, body, chunk = self.buf, self.data, self.chunk  # locals: ~350,000 1-byte chunks fit in 2 MB
        buf += data
        pos, end = 0, len(buf)
        try:
            while True:
                if chunk < 0:
                    eol = buf.find(b"\r\n", pos)
                    if eol < 0:
                        if end - pos > MAX_LINE:
                            raise Refused("LineTooLong: chunk size line")
                        return False
                    start, pos = pos, eol + 2
                    if chunk == -2:  # trailers, up to an empty line
                        if eol == start:
                            return True
                        continue
                    try:
                        chunk = int(buf[start:eol], 16)  # int() strips what .strip() would
                    except ValueError:  # an extension (`;name=value`), or not a size
                        chunk = -1
                    if chunk <= 0:
                        chunk = _chunk_size(bytes(buf[start:eol])) or -2
                    continue
                if end - pos < chunk + 2:
                    return False  # the rest of the chunk (already counted on the wire) comes later
                body += buf[pos: pos + chunk]
                pos += chunk + 2
                chunk = -1
        finally:
            self.chunk = chunk
            del buf[:pos]

    def _head(self, head: bytes) -> None:
        # Each head on its own: an interim answer's framing headers say nothing of the answer after it.
        self.chunked, self.length = False, None
        lines = head.split(b"\r\n")
        # http.client's _read_status and begin(), step for step (a latin-1 str, split on any whitespace).
        parts = lines[0].decode("iso-8859-1").split(None, 2)
        version = parts[0] if parts else ""
        if not version.startswith("HTTP/") or len(parts) < 2:
            raise Closed  # BadStatusLine (told as "connection closed by the server")
        try:
            status = int(parts[1])
        except ValueError:
            raise Closed from None
        if not 100 <= status <= 999:
            raise Closed
        if version not in ("HTTP/1.0", "HTTP/0.9") and not version.startswith("HTTP/1."):
            raise Refused(f"UnknownProtocol: {version}")
        if len(lines) - 1 > MAX_HEADERS:
            raise Refused(f"HTTPException: got more than {MAX_HEADERS} headers")
        connection = b""
        for line in lines[1:]:
            name, sep, value = line.partition(b":")
            if not sep:
                continue
            name, value = name.strip().lower(), value.strip()
            if name == b"content-length":
                self.length = int(value) if value.isdigit() else None
            elif name == b"transfer-encoding":
                self.chunked = b"chunked" in value.lower()
            elif name == b"connection":
                connection = value.lower()
        self.status = status
        if version in ("HTTP/1.0", "HTTP/0.9"):
            self.will_close = b"keep-alive" not in connection
        else:
            self.will_close = b"close" in connection
        if self.chunked:
            self.length = None
        elif self.length is None:
            self.will_close = True  # a body that ends with the connection


def _chunk_size(line: bytes) -> int:
    """http.client's reading of a chunk size line: hex digits up to any `;`; a negative size is refused too."""
    try:
        size = int(line.split(b";", 1)[0].strip(), 16)
    except ValueError:
        size = -1
    if size < 0:
        raise Refused(f"IncompleteRead: bad chunk size {line[:20]!r}")
    return size

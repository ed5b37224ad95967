"""An incremental HTTP/1.1 response reader for the batch scrape loop (fdngx.weights.batch): bytes in as they
arrive, a status and a body out, reading what http.client reads and refusing what it refuses.

Framing: Content-Length, chunked (extensions and trailers allowed), or until the connection closes (HTTP/1.0,
or no length); interim 1xx answers are skipped; 204 and 304 have no body. Like http.client's read1, a body cut
short by the close is returned as it is. The body counts against `max_bytes` as it arrives (`oversize`).
"""

from __future__ import annotations

MAX_LINE = 65536  # http.client's limit for the status line and each header line
MAX_HEADERS = 100  # http.client's limit


class Closed(Exception):
    """The peer closed before a response could be read (http.client: RemoteDisconnected, BadStatusLine)."""


class Refused(Exception):
    """A response http.client would refuse; the text names what, as its exception does."""


class Response:
    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.buf = bytearray()
        self.parts: list[bytes] = []
        self.size = 0  # body bytes so far
        self.status = 0
        self.will_close = False
        self.head_done = False
        self.chunked = False
        self.length: int | None = None  # Content-Length
        self.chunk = -1  # chunked: bytes left in the current chunk; -1 a size line next; -2 trailers next
        self.oversize = False

    @property
    def started(self) -> bool:
        """Any byte of a response arrived (a kept-alive connection that fails before is worth one retry)."""
        return self.head_done or bool(self.buf)

    def body(self) -> bytes:
        return b"".join(self.parts)

    def feed(self, data: bytes) -> bool:
        """Take bytes; True once the response is complete (or `oversize`). Raises Closed or Refused."""
        if not self.head_done:
            self.buf += data
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                if len(self.buf) > 2 * MAX_LINE:
                    raise Refused(f"LineTooLong: got more than {MAX_LINE} bytes when reading header line")
                return False
            head, data = bytes(self.buf[:end]), bytes(self.buf[end + 4:])
            self.buf = bytearray()
            self._head(head)
            if 100 <= self.status < 200:  # an interim answer (100 Continue): the real one follows
                self.status = 0
                return self.feed(data) if data else False
            self.head_done = True
            if self.status in (204, 304) or (not self.chunked and self.length == 0):
                return True
        return self._chunks(data) if self.chunked else self._plain(data)

    def eof(self) -> bool:
        """The peer closed: True if that ends the response (a body delimited by the close); else Closed."""
        if self.head_done and not self.chunked:
            self.will_close = True
            return True
        raise Closed

    def _add(self, piece: bytes) -> bool:
        self.parts.append(piece)
        self.size += len(piece)
        self.oversize = self.size > self.max_bytes
        return self.oversize

    def _plain(self, data: bytes) -> bool:
        if data and self._add(data):
            return True
        if self.length is not None and self.size >= self.length:
            if self.size > self.length:  # bytes past the length are not this response's
                body = self.body()[: self.length]
                self.parts, self.size = [body], len(body)
            return True
        return False

    def _chunks(self, data: bytes) -> bool:
        self.buf += data
        while True:
            if self.chunk < 0:
                eol = self.buf.find(b"\r\n")
                if eol < 0:
                    if len(self.buf) > MAX_LINE:
                        raise Refused("LineTooLong: chunk size line")
                    return False
                line = bytes(self.buf[:eol])
                del self.buf[: eol + 2]
                if self.chunk == -2:  # trailers, up to an empty line
                    if not line:
                        return True
                    continue
                try:
                    self.chunk = int(line.split(b";", 1)[0].strip(), 16)
                except ValueError:
                    raise Refused(f"IncompleteRead: bad chunk size {line[:20]!r}") from None
                if self.chunk == 0:
                    self.chunk = -2
                continue
            if len(self.buf) < self.chunk + 2:
                # A chunk counts against max_bytes as it arrives, not once whole: a chunk size line of
                # fffffffffff must not buffer gigabytes first.
                partial = min(len(self.buf), self.chunk)
                return self.size + partial > self.max_bytes and self._add(bytes(self.buf[:partial]))
            piece = bytes(self.buf[: self.chunk])
            del self.buf[: self.chunk + 2]
            self.chunk = -1
            if self._add(piece):
                return True

    def _head(self, head: bytes) -> None:
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

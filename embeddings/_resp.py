"""A minimal RESP2 connection for the Redis tier's hot path (pipelined MGETs, hard deadlines).

redis-py stays in use for everything else (push, metadata, slot maps). On the lookup path it
spent more time packing and parsing than Redis spent answering (about 140 us to pack and
230 us to parse one 150-key MGET, measured), and its timeouts are per socket read, not per
reply. This speaks just the protocol the lookups need: arrays of bulk strings, nil, errors.
"""

from __future__ import annotations

import socket
import time


class RespError(Exception):
    """An error reply (``-MOVED ...``, ``-CLUSTERDOWN ...``); the connection stays usable."""

    @property
    def kind(self) -> str:
        return str(self).split(" ", 1)[0]


class ProtocolError(ConnectionError):
    """A reply this client cannot parse; the connection is dropped."""


def pack_command(*args: bytes) -> bytes:
    parts = [b"*%d\r\n" % len(args)]
    parts.extend(b"$%d\r\n%s\r\n" % (len(a), a) for a in args)
    return b"".join(parts)


_INCOMPLETE = object()


class RespConnection:
    """One TCP connection; not thread-safe (the store serialises its lookups)."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self._sock: socket.socket | None = None
        self._buf = bytearray()

    @property
    def connected(self) -> bool:
        return self._sock is not None

    def connect(self, timeout_s: float) -> None:
        sock = socket.create_connection((self.host, self.port), timeout=max(timeout_s, 1e-3))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._sock = sock
        self._buf.clear()

    def close(self) -> None:
        if self._sock is not None:
            try:
                self._sock.close()
            finally:
                self._sock = None
                self._buf.clear()

    def send(self, data: bytes, timeout_s: float) -> None:
        if self._sock is None:
            raise ConnectionError(f"not connected to {self.host}:{self.port}")
        self._sock.settimeout(max(timeout_s, 1e-3))
        self._sock.sendall(data)

    def read(self, timeout_s: float) -> list[bytes | None] | RespError | bytes | int:
        """The next reply, waiting at most ``timeout_s`` in total (TimeoutError after that)."""
        if self._sock is None:
            raise ConnectionError(f"not connected to {self.host}:{self.port}")
        give_up = time.monotonic() + timeout_s
        while True:
            try:
                parsed = self._parse()
            except ValueError as exc:  # a length that is not a number
                raise ProtocolError(f"bad reply from {self.host}:{self.port}: {exc}") from exc
            if parsed is not _INCOMPLETE:
                return parsed  # type: ignore[return-value]
            left = give_up - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no reply from {self.host}:{self.port} in {timeout_s:.3f}s")
            self._sock.settimeout(left)
            chunk = self._sock.recv(1 << 18)
            if not chunk:
                raise ConnectionError(f"{self.host}:{self.port} closed the connection")
            self._buf += chunk

    def _parse(self) -> object:
        """One complete reply from the buffer (consumed), or ``_INCOMPLETE``."""
        buf = self._buf
        eol = buf.find(b"\r\n")
        if eol < 0:
            return _INCOMPLETE
        kind = buf[0]
        pos = eol + 2
        value: object
        if kind == 42:  # '*' array (of bulk strings: all that MGET returns)
            items: list[bytes | None] = []
            for _ in range(int(buf[1:eol])):
                eol = buf.find(b"\r\n", pos)
                if eol < 0:
                    return _INCOMPLETE
                if buf[pos] != 36:
                    raise ProtocolError(f"unexpected array item {bytes(buf[pos : pos + 16])!r}")
                size = int(buf[pos + 1 : eol])
                if size < 0:
                    items.append(None)
                    pos = eol + 2
                    continue
                end = eol + 2 + size
                if end + 2 > len(buf):
                    return _INCOMPLETE
                items.append(bytes(buf[eol + 2 : end]))
                pos = end + 2
            value = items
        elif kind == 45:  # '-' error
            value = RespError(buf[1:eol].decode(errors="replace"))
        elif kind == 43:  # '+' simple string
            value = bytes(buf[1:eol])
        elif kind == 58:  # ':' integer
            value = int(buf[1:eol])
        else:
            raise ProtocolError(f"unexpected reply {bytes(buf[:16])!r}")
        del buf[:pos]
        return value

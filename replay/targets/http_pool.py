"""Keep-alive connections (`http_stream.Conn`) to one server for the OpenAI target's streamed POSTs:
at most `limit` in use at once, a connection reused only after its response ended cleanly; connect
failures become error kinds here (refused, timed out)."""

from __future__ import annotations

import asyncio
import contextlib
import ssl

from replay.core import errors
from replay.targets.http_failures import Failure
from replay.targets.http_stream import Conn, Uploads


class Pool:
    """Keep-alive connections to one host; at most `limit` in use at once (0: no limit, so an
    open-loop request never queues behind the pool)."""

    def __init__(self, host: str, port: int, limit: int, connect_timeout_s: float,
                 tls: ssl.SSLContext | None = None) -> None:  # fmt: skip
        self.host = host
        self.port = port
        self.connect_timeout_s = connect_timeout_s
        self.tls = tls
        self._sem = asyncio.Semaphore(limit) if limit > 0 else None
        self._idle: list[Conn] = []
        self._open: set[Conn] = set()
        self._uploads = Uploads()

    async def acquire(self) -> Conn:
        if self._sem is not None:
            await self._sem.acquire()
        try:
            idle = self._idle
            while idle:
                conn = idle.pop()
                if conn.reusable:
                    return conn
                conn.close()
            return await self._connect()
        except BaseException:
            if self._sem is not None:
                self._sem.release()
            raise

    def release(self, conn: Conn, reuse: bool) -> None:
        """Back to the pool if its last response ended cleanly, else closed."""
        if reuse and conn.reusable:
            self._idle.append(conn)
        else:
            conn.close()
        if self._sem is not None:
            self._sem.release()

    def close(self) -> None:
        for conn in list(self._open):
            conn.close()
        self._idle.clear()

    async def _connect(self) -> Conn:
        loop = asyncio.get_running_loop()
        where = f"{self.host}:{self.port}"
        try:
            async with asyncio.timeout(self.connect_timeout_s):
                _, conn = await loop.create_connection(lambda: Conn(self._lost, self._uploads), self.host,
                                                       self.port, ssl=self.tls)  # fmt: skip
        except TimeoutError:
            why = f"connect to {where} timed out ({self.connect_timeout_s:g} s)"
            raise Failure(errors.CONNECT_TIMEOUT, why) from None
        except OSError as exc:
            why = f"cannot connect to {where}: {exc.strerror or exc}"
            raise Failure(errors.CONNECT_REFUSED, why) from None
        self._open.add(conn)
        return conn

    def _lost(self, conn: Conn) -> None:
        self._open.discard(conn)
        with contextlib.suppress(ValueError):
            self._idle.remove(conn)

"""A TCP proxy the test owns, in front of PostgreSQL, to cut the database away from the service
without touching the machine's shared server. Runs its own event loop in a thread."""

from __future__ import annotations

import asyncio
import threading
from urllib.parse import parse_qsl, urlsplit, urlunsplit

from tests.live import free_port


class DatabaseProxy:
    def __init__(self, target_dsn: str) -> None:
        parts = urlsplit(target_dsn)
        query = dict(parse_qsl(parts.query))
        self._socket_dir = query.pop("host", None)
        self._host = parts.hostname or "127.0.0.1"
        self._port = parts.port or 5432
        self.port = free_port()
        user = parts.netloc.rpartition("@")[0]
        netloc = f"{user}@127.0.0.1:{self.port}" if user else f"127.0.0.1:{self.port}"
        rest = "&".join(f"{k}={v}" for k, v in query.items())
        self.dsn = urlunsplit((parts.scheme, netloc, parts.path, rest, ""))
        self._loop = asyncio.new_event_loop()
        self._server: asyncio.AbstractServer | None = None
        self._pipes: set[asyncio.StreamWriter] = set()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self.resume()

    def _run(self, coroutine):
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(10)

    async def _connect_upstream(self):
        if self._socket_dir:
            return await asyncio.open_unix_connection(f"{self._socket_dir}/.s.PGSQL.{self._port}")
        return await asyncio.open_connection(self._host, self._port)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await self._connect_upstream()
        except OSError:
            writer.close()
            return
        self._pipes.update((writer, up_writer))

        async def pump(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
            try:
                while data := await source.read(65536):
                    sink.write(data)
                    await sink.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                sink.close()

        await asyncio.gather(pump(reader, up_writer), pump(up_reader, writer))
        self._pipes.discard(writer)
        self._pipes.discard(up_writer)

    async def _start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port, reuse_address=True)

    async def _cut(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        for pipe in list(self._pipes):
            pipe.transport.abort()
        self._pipes.clear()

    def cut(self) -> None:
        """Drop every connection and refuse new ones: the database is gone."""
        self._run(self._cut())

    def resume(self) -> None:
        self._run(self._start())

    def close(self) -> None:
        self.cut()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

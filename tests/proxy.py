"""A TCP proxy the test owns, in front of PostgreSQL (TCP or the embedded server's socket), so
an outage is simulated without touching the machine's shared server."""

from __future__ import annotations

import asyncio
import contextlib
from urllib.parse import parse_qsl, urlsplit, urlunsplit


class TcpProxy:
    """A TCP proxy in front of the database that the test can take down and bring back, so an
    outage is simulated without touching the (possibly shared) server."""

    def __init__(self, dsn: str) -> None:
        parts = urlsplit(dsn)
        query = dict(parse_qsl(parts.query))
        self._dsn_parts = parts
        self._socket_dir = query.get("host")
        self._upstream_host = parts.hostname or "127.0.0.1"
        self._upstream_port = parts.port or 5432
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self.port = 0

    @property
    def dsn(self) -> str:
        assert self.port, "start() the proxy first"
        user = self._dsn_parts.netloc.rpartition("@")[0]
        return urlunsplit(("postgresql", f"{user}@127.0.0.1:{self.port}", self._dsn_parts.path, "", ""))

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        """The database 'goes away': refuse new connections and cut the open ones."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()

    async def _open_upstream(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if self._socket_dir:
            return await asyncio.open_unix_connection(f"{self._socket_dir}/.s.PGSQL.{self._upstream_port}")
        return await asyncio.open_connection(self._upstream_host, self._upstream_port)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await self._open_upstream()
        except OSError:
            writer.transport.abort()
            return
        self._writers.update((writer, up_writer))

        async def pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
            with contextlib.suppress(Exception):
                while data := await source.read(65536):
                    sink.write(data)
                    await sink.drain()
            sink.transport.abort()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        self._writers.discard(writer)
        self._writers.discard(up_writer)

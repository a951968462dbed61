"""A server that speaks just enough RESP for a client to connect, then answers with bytes a test
chose: for fuzzing how replies are read.

It answers the handshake (``HELLO``, ``CLIENT ...``, ``SELECT``, ``AUTH``) and ``PING`` as Redis
would. Every other command takes the next :class:`Answer` from the script: its bytes are written
in the pieces given (each written and drained on its own, so the client reads them split there),
then the connection is closed or left open.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses

import hiredis


@dataclasses.dataclass
class Answer:
    pieces: list[bytes]
    close: bool = False


class RespServer:
    def __init__(self) -> None:
        self.script: collections.deque[Answer] = collections.deque()
        self.port = 0
        self.commands: list[list[bytes]] = []
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def __aenter__(self) -> RespServer:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for w in list(self._writers):
            w.transport.abort()
        await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        parser = hiredis.Reader()
        protocol = 2
        try:
            while data := await reader.read(65536):
                parser.feed(data)
                while (command := parser.gets()) is not False:
                    name = command[0].upper()
                    if name == b"HELLO":
                        protocol = int(command[1]) if len(command) > 1 else protocol
                        if protocol == 3:
                            writer.write(b"%1\r\n$5\r\nproto\r\n:3\r\n")
                        else:
                            writer.write(b"*2\r\n$5\r\nproto\r\n:2\r\n")
                    elif name in (b"CLIENT", b"SELECT", b"AUTH"):
                        writer.write(b"+OK\r\n")
                    elif name == b"PING":
                        writer.write(b"+PONG\r\n")
                    else:
                        self.commands.append(command)
                        answer = self.script.popleft() if self.script else Answer([b"+OK\r\n"])
                        for piece in answer.pieces:
                            writer.write(piece)
                            await writer.drain()
                        if answer.close:
                            writer.transport.abort()
                            return
                    await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            self._writers.discard(writer)
            with contextlib.suppress(Exception):
                writer.transport.abort()

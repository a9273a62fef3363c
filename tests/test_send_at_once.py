"""send_or_drop writes at once, in the caller's task: a megabyte answer the socket takes whole is not held
back behind the callbacks already waiting on the loop (the last request's log line and ledger record);
a client that keeps reading is never cut off, one that stops is (tests/test_slow_clients.py, end to end)."""

from __future__ import annotations

import asyncio
import socket

from proxy.http.send import send_or_drop


async def _connection() -> tuple[asyncio.StreamWriter, asyncio.StreamReader, asyncio.Server]:
    """A real loopback connection: the client side's writer (whose transport send_or_drop watches), the
    server side's reader."""
    accepted: asyncio.Queue[asyncio.StreamReader] = asyncio.Queue()

    async def on_client(reader: asyncio.StreamReader, _writer: asyncio.StreamWriter) -> None:
        await accepted.put(reader)

    server = await asyncio.start_server(on_client, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    _, writer = await asyncio.open_connection("127.0.0.1", port)
    return writer, await accepted.get(), server


async def test_the_write_goes_out_before_callbacks_already_waiting():
    writer, reader, server = await _connection()
    order: list[str] = []
    asyncio.get_running_loop().call_soon(order.append, "callback waiting on the loop")

    async def write() -> None:
        order.append("write")
        writer.transport.write(b"x" * 1_000_000)

    await send_or_drop(write(), writer.transport, 5)
    assert order[0] == "write"
    assert len(await reader.readexactly(1_000_000)) == 1_000_000
    writer.close()
    server.close()


async def test_a_client_that_reads_slowly_gets_everything():
    """The socket full for longer than `stall` in all, but the reader takes some at every look: not cut off."""
    writer, reader, server = await _connection()
    sock = writer.transport.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 65536)
    size = 8_000_000

    async def write() -> None:
        writer.write(b"y" * size)
        await writer.drain()

    async def read_slowly() -> int:
        got = 0
        while got < size:
            got += len(await reader.read(200_000))
            await asyncio.sleep(0.01)
        return got

    reading = asyncio.ensure_future(read_slowly())
    await send_or_drop(write(), writer.transport, 0.05)  # ~0.4 s of reading, a look every 0.05 s
    assert await reading == size
    writer.close()
    server.close()


async def test_a_client_that_takes_nothing_is_dropped():
    writer, _reader, server = await _connection()
    writer.transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 65536)

    async def write() -> None:
        writer.write(b"z" * 20_000_000)
        await writer.drain()

    try:
        await asyncio.wait_for(send_or_drop(write(), writer.transport, 0.2), 10)
    except ConnectionResetError as e:
        assert "took none of its answer for 0.2 s" in str(e)
    else:
        raise AssertionError("the client was not dropped")
    assert writer.transport.is_closing()
    server.close()

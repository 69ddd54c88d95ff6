"""The worker's connection as the front process reads it on its event loop, against the worker's own
`multiprocessing.connection` end of a real socket pair."""

import asyncio
import logging
import socket
from multiprocessing.connection import Connection

import pytest

from mlx_tui.engine import events as ev
from mlx_tui.engine.protocol import Cancel, Events, GetStats, Reply
from mlx_tui.engine.worker_process import WorkerConnection

pytestmark = pytest.mark.asyncio

EVERY_EVENT = [
    ev.Queued(2),
    ev.Started(10, 4, "the prompt", 3, "a grammar", "<tool_call>"),
    ev.PrefillProgress(5, 10),
    ev.TextDelta("héllo"),
    ev.ReasoningDelta("hmm"),
    ev.RawText("<think>"),
    ev.ToolCallStart(0, "abc", "Bash"),
    ev.ToolCallDelta(0, '{"command": '),
    ev.ToolCallEnd(0, "abc", "Bash", {"command": ["ls", 1, None]}, '{"command": ["ls", 1, null]}'),
    ev.ToolCallAbandoned(1, "def", '"}'),
    ev.ParseError("tool call did not parse", "<tool_call>{</tool_call>"),
    ev.Done("stop_sequence", ev.Usage(10, 4, 6, 2), ev.Timings(0.1, 0.2, 0.3), "END", "repetition"),
    ev.Error("engine", "the batched step failed"),
]


async def connected() -> tuple[WorkerConnection, Connection, list]:
    """The front's end on the running loop, the worker's end, and the list the front's messages arrive in."""
    front, worker = socket.socketpair()
    received: list = []
    _, connection = await asyncio.get_running_loop().connect_accepted_socket(
        lambda: WorkerConnection(received.append), front
    )
    return connection, Connection(worker.detach()), received


async def arrived(received: list, count: int) -> None:
    async with asyncio.timeout(10):
        while len(received) < count:
            await asyncio.sleep(0.01)


async def test_messages_arrive_whole_and_in_order_whatever_their_size():
    connection, worker, received = await connected()
    big = "x" * 300_000  # several reads on the socket, and sent as header and body apart
    sent = [Events([("req_1", e) for e in EVERY_EVENT]), Reply(1, {"prompt": big}), Events([]), Reply(2, 3)]
    await asyncio.to_thread(lambda: [worker.send(m) for m in sent])
    await arrived(received, len(sent))
    assert received == sent
    worker.close()
    await asyncio.wait_for(connection.closed, 10)


async def test_what_the_front_sends_the_worker_receives():
    connection, worker, _ = await connected()
    for message in (Cancel("req_1"), GetStats(7)):
        connection.send(message)
        assert await asyncio.to_thread(worker.recv) == message
    worker.close()


async def test_a_message_that_fails_to_be_handled_leaves_the_connection_open(caplog):
    front, worker_socket = socket.socketpair()
    received: list = []

    def handle(message):
        if message == Reply(1, "bad"):
            raise ValueError("a bug")
        received.append(message)

    _, connection = await asyncio.get_running_loop().connect_accepted_socket(lambda: WorkerConnection(handle), front)
    worker = Connection(worker_socket.detach())
    with caplog.at_level(logging.ERROR, logger="mlx_tui.engine"):
        await asyncio.to_thread(lambda: [worker.send(Reply(1, "bad")), worker.send(Reply(2, "good"))])
        await arrived(received, 1)
    assert received == [Reply(2, "good")]
    assert "handling a message from the worker failed" in caplog.text
    assert not connection.closed.done()
    worker.close()

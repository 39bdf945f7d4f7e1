"""The worker's connection table on real socket pairs: which connections it closes to make room, and when."""

from __future__ import annotations

import socket

import pytest

from serve.connections import ConnectionTable


@pytest.fixture()
def pairs():
    """pairs(n) -> n connected (server end, client end) socket pairs, closed afterwards."""
    made: list[tuple[socket.socket, socket.socket]] = []

    def make(count: int) -> list[tuple[socket.socket, socket.socket]]:
        new = [socket.socketpair() for _ in range(count)]
        made.extend(new)
        return new

    yield make
    for server, client in made:
        server.close()
        client.close()


def _closed_by_server(client: socket.socket) -> bool:
    """The server end shut the connection down: the client reads the end of the stream."""
    client.setblocking(False)
    try:
        return client.recv(1) == b""
    except BlockingIOError:
        return False


def test_a_full_table_closes_the_longest_waiting_connections_never_busy_ones(pairs):
    table = ConnectionTable(limit=4)
    connections = pairs(7)
    servers = [server for server, _ in connections]
    for server in servers[:4]:
        table.opened(server)
    table.busy(servers[0])  # a request being served: never closed to make room
    table.opened(servers[4])  # full: the longest waiting (servers[1]) goes
    table.opened(servers[5])  # and then servers[2]
    table.busy(servers[3])  # its request's headers are in ...
    with table.body_wait(servers[3]):  # ... and its body on the way: it waits on its client again, since now
        table.opened(servers[6])  # servers[4] has waited longest
    closed = [_closed_by_server(client) for _, client in connections]
    assert closed == [False, True, True, False, True, False, False]
    assert table.num_evicted == 3


def test_a_request_that_finishes_waits_again_at_the_back(pairs):
    table = ConnectionTable(limit=3)
    connections = pairs(4)
    servers = [server for server, _ in connections]
    for server in servers[:3]:
        table.opened(server)
    table.busy(servers[0])
    table.idle(servers[0])  # its reply is out: idle again, now the most recent
    for server in servers[1:3]:
        table.closed(server)  # the clients left on their own
    table.opened(servers[3])
    assert [_closed_by_server(client) for _, client in connections] == [False, False, False, False]
    assert table.num_open == 2


def test_stopping_closes_idle_connections_now_and_the_rest_after_the_grace_period(pairs):
    table = ConnectionTable(limit=100)
    (idle, idle_client), (serving, serving_client), (uploading, uploading_client) = pairs(3)
    for server in (idle, serving, uploading):
        table.opened(server)
    table.busy(serving)
    with table.body_wait(uploading):
        table.close_idle()
        assert [_closed_by_server(c) for c in (idle_client, serving_client, uploading_client)] == [True, False, False]
        assert table.num_busy == 2  # a body being read is a request in flight
        table.close_waiting()  # the grace period is over
        assert _closed_by_server(uploading_client)
    table.idle(serving)  # its reply is out: a stopping worker takes no further request on it
    assert _closed_by_server(serving_client)


def test_a_connection_whose_body_was_not_read_whole_closes_after_its_reply(pairs):
    table = ConnectionTable(limit=100)
    [(server, client)] = pairs(1)
    table.opened(server)
    table.busy(server)
    table.close_after_reply(server)
    assert not _closed_by_server(client)
    table.idle(server)
    assert _closed_by_server(client)

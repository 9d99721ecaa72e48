"""The load generator of `ctr bench overhead` (loadtest/http_load.py): every request gets the
status its server sent, over kept-alive connections, whatever came before it on the same
connection."""

from __future__ import annotations

import json
import socketserver
import threading
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest

from loadtest import http_load
from loadtest.http_load import NO_ANSWER, post_request
from loadtest.local_service import LocalService

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def service(service_model_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    log = tmp_path_factory.mktemp("http-load") / "service.log"
    with LocalService(service_model_repo, log, {"CTR_DEFAULT_MODEL": "sarn"}) as running:
        yield running.url


def _requests(url: str, service_model_repo: Path) -> dict[str, bytes]:
    """A valid scoring request, one the API refuses (422) and one to no route (404)."""
    events = pd.read_parquet(service_model_repo.parent / "world" / "events.parquet")
    candidates = [
        {"item_id": str(i), "category_id": str(c)}
        for i, c in events[["item_id", "category_id"]].drop_duplicates().head(5).values
    ]
    body = json.dumps({"user_id": "u1", "candidates": candidates}).encode()
    return {
        "ok": post_request(url, "/v1/score", body),
        "invalid": post_request(url, "/v1/score", b'{"user_id": "u1", "candidates": []}'),
        "missing": post_request(url, "/v1/nowhere", body),
    }


def test_open_loop_gets_each_answer_on_one_kept_alive_connection(
    service: str, service_model_repo: Path
) -> None:
    """One connection carries all nine requests, so a body left unread, or read too far, would
    shift every status after it."""
    requests = _requests(service, service_model_repo)
    kinds = ["ok", "invalid", "missing"] * 3
    starts = [0.02 * i for i in range(len(kinds))]
    answers = http_load.open_loop(service, [requests[k] for k in kinds], starts, connections=1)
    expected = {"ok": 200, "invalid": 422, "missing": 404}
    assert [a.status for a in answers] == [expected[k] for k in kinds]
    assert all(0 <= a.late <= a.seconds for a in answers)


def test_closed_loop_clients_take_the_requests_in_turn(
    service: str, service_model_repo: Path
) -> None:
    requests = _requests(service, service_model_repo)
    answers = http_load.closed_loop(
        service, [requests["ok"], requests["invalid"]], clients=1, seconds=0.5
    )
    assert len(answers) >= 4
    assert [a.status for a in answers] == [(200, 422)[i % 2] for i in range(len(answers))]


class _RequestReader(socketserver.StreamRequestHandler):
    """Stand-in servers' request reading: the head, then a body of its content-length."""

    def _read_request(self) -> bool:
        head = b""
        while not head.endswith(b"\r\n\r\n"):
            line = self.rfile.readline()
            if not line:
                return False
            head += line
        length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
        self.rfile.read(length)
        return True


class _FlakyHandler(_RequestReader):
    """A stand-in server, to force what the service never does: its first connection closes
    without an answer; later ones answer a chunked 200, then a 201 with a length."""

    connections = 0

    def handle(self) -> None:
        type(self).connections += 1
        answers = [
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"
            b"5\r\nhello\r\n6;x=1\r\n world\r\n0\r\n\r\n",
            b"HTTP/1.1 201 Created\r\ncontent-length: 2\r\n\r\nok",
        ]
        for answer in answers:
            if not self._read_request():
                return
            if type(self).connections == 1:
                return  # closes with the request unanswered
            self.wfile.write(answer)


def test_a_broken_connection_is_no_answer_and_the_next_request_reconnects() -> None:
    with socketserver.ThreadingTCPServer(("127.0.0.1", 0), _FlakyHandler) as server:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        url = f"http://127.0.0.1:{server.server_address[1]}"
        request = post_request(url, "/x", b"{}")
        answers = http_load.burst(url, [request] * 3, connections=1)
        server.shutdown()
    assert [a.status for a in answers] == [NO_ANSWER, 200, 201]


class _OneAnswerHandler(_RequestReader):
    """Answers one request per connection, then closes it, as a server does with a connection
    left idle past its keep-alive timeout."""

    def handle(self) -> None:
        if self._read_request():
            self.wfile.write(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")


def test_a_connection_the_server_closed_while_idle_is_reopened_before_the_next_request() -> None:
    with socketserver.ThreadingTCPServer(("127.0.0.1", 0), _OneAnswerHandler) as server:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        url = f"http://127.0.0.1:{server.server_address[1]}"
        request = post_request(url, "/x", b"{}")
        answers = http_load.open_loop(url, [request] * 2, [0.0, 0.3], connections=1)
        server.shutdown()
    assert [a.status for a in answers] == [200, 200]

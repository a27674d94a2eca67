"""Strangers cannot stall the coordinator (issue 24, item 2): refused by headers, bodies counted as they stream.

Real ``noodle serve`` processes on 127.0.0.1, spoken to with raw sockets (to send exactly the
headers a hostile client sends, and no body) and httpx.
"""

from __future__ import annotations

import select
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest

from noodle.serve.guard import JOIN_BYTES, MAX_REQUEST_BYTES, SMALL_BYTES

from .conftest import API_KEY
from .edge import connect, read_reply, request_head
from .servers import ServeProc, start_serve

TOKEN = "edge-cluster-token"
MODEL = "gpt2-tiny"
KEY = {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture(scope="module")
def cluster(model_dir: Path) -> Iterator[ServeProc]:
    """``noodle serve --cluster`` waiting for 9 workers that never come (its HTTP side serves meanwhile)."""
    args = ["--model", str(model_dir), "--cluster", "--token", TOKEN, "--api-key", API_KEY, "--min-workers", "9"]
    with start_serve(args, ready=False) as sp:
        yield sp


def _refused_by_headers(base: str, path: str, headers: dict[str, str], declared: int) -> tuple[int, dict[str, str]]:
    """Send only the headers (declaring ``declared`` body bytes) and a few body bytes; the answer must come anyway."""
    with connect(base) as sock:
        sock.sendall(request_head("POST", path, {"Content-Type": "application/json", "Content-Length": str(declared),
                                                 **headers}) + b'{"id": ')  # fmt: skip
        reply = read_reply(sock)
        assert sock.recv(1) == b""  # the connection is closed: the rest of the body is never read
    return reply.status, reply.json()["error"]


def test_cluster_routes_refuse_strangers_before_their_body(cluster: ServeProc) -> None:
    status, err = _refused_by_headers(cluster.base, "/noodle/cluster/join", {}, 100_000_000)
    assert status == 401 and err["code"] == "invalid_api_key", err
    status, err = _refused_by_headers(cluster.base, "/noodle/cluster/join", {"Authorization": "Bearer wrong"}, 10**8)
    assert status == 401, err
    # a malformed body without the token: 401, not a 400 naming a field of the body it should never have read
    r = httpx.post(f"{cluster.base}/noodle/cluster/join", content=b'{"id": 5, "costs": []}', timeout=10)
    assert r.status_code == 401, r.text
    auth = {"Authorization": f"Bearer {TOKEN}"}
    status, err = _refused_by_headers(cluster.base, "/noodle/cluster/join", auth, JOIN_BYTES + 1)
    assert status == 413 and err["code"] == "request_too_large" and str(JOIN_BYTES) in err["message"], err
    status, err = _refused_by_headers(cluster.base, "/noodle/cluster/heartbeat", auth, SMALL_BYTES + 1)
    assert status == 413, err
    r = httpx.post(f"{cluster.base}/noodle/cluster/join", content=b'{"id": 5}', headers=auth, timeout=10)
    assert r.status_code == 400 and r.json()["error"]["param"], r.text  # with the token the body is read and judged


def test_v1_refuses_by_headers(server: ServeProc) -> None:
    status, err = _refused_by_headers(server.base, "/v1/completions", {}, 10_000_000)
    assert status == 401 and err["code"] == "invalid_api_key", err
    status, err = _refused_by_headers(server.base, "/v1/chat/completions", KEY, MAX_REQUEST_BYTES + 1)
    assert status == 413 and "--max-request-bytes" in err["message"], err


def _upload_chunked(base: str, path: str, headers: dict[str, str], chunk: bytes, during: int,
                    probe: httpx.Client, probe_path: str, probe_kwargs: dict[str, object]) -> tuple[int, int, int]:  # fmt: skip
    """Stream a chunked body; after ``during`` chunks, call the probe route. Returns (probe status, bytes sent, reply)."""
    sent, probed = 0, 0
    with connect(base) as sock:
        sock.sendall(request_head("POST", path, {"Content-Type": "application/json", "Transfer-Encoding": "chunked",
                                                 **headers}) + b"")  # fmt: skip
        piece = b"%x\r\n%s\r\n" % (len(chunk), chunk)
        for i in range(64):
            if select.select([sock], [], [], 0.05)[0]:
                break  # the server answered: stop sending
            sock.sendall(piece)
            sent += len(chunk)
            if i + 1 == during:
                assert not select.select([sock], [], [], 0)[0]  # the upload is still going on
                t0 = time.perf_counter()
                probed = probe.request("POST" if probe_kwargs else "GET", f"{base}{probe_path}", **probe_kwargs).status_code
                print(f"{probe_path} answered {probed} in {(time.perf_counter() - t0) * 1e3:.1f} ms mid-upload")
                assert not select.select([sock], [], [], 0)[0]  # ... and still not refused: the probe came first
        reply = read_reply(sock)
    return probed, sent, reply.status


def test_a_chunked_body_is_cut_at_the_limit_while_healthz_answers(server: ServeProc) -> None:
    chunk = b"x" * (1 << 20)
    with httpx.Client(timeout=30) as probe:
        healthz, sent, status = _upload_chunked(server.base, "/v1/completions", KEY, chunk, 3, probe, "/healthz", {})
    assert healthz == 200
    assert status == 413
    assert MAX_REQUEST_BYTES < sent <= MAX_REQUEST_BYTES + 4 * len(chunk)  # cut at the limit, not at the end


def test_heartbeats_answer_while_a_join_body_streams(cluster: ServeProc) -> None:
    auth = {"Authorization": f"Bearer {TOKEN}"}
    beat = {"json": {"id": "nobody", "load": 0.0, "free_memory_bytes": 1}, "headers": auth}
    with httpx.Client(timeout=30) as probe:
        answered, sent, status = _upload_chunked(cluster.base, "/noodle/cluster/join", auth, b"y" * (256 << 10), 4,
                                                 probe, "/noodle/cluster/heartbeat", beat)  # fmt: skip
    assert answered == 404  # judged (an unknown node) while the other body was still arriving
    assert status == 413 and JOIN_BYTES < sent


def test_a_huge_prompt_is_refused_before_it_is_tokenized(server: ServeProc) -> None:
    proc = psutil.Process(server.proc.pid)
    before = proc.memory_info().rss
    prompt = "a" * (7 << 20)  # under the body limit, far over what 255 prompt tokens can spell
    t0 = time.perf_counter()
    r = httpx.post(f"{server.base}/v1/completions", json={"model": MODEL, "prompt": prompt, "max_tokens": 1},
                   headers=KEY, timeout=120)  # fmt: skip
    print(f"7 MiB prompt refused in {time.perf_counter() - t0:.2f} s")
    err = r.json()["error"]
    assert r.status_code == 400 and err["code"] == "context_length_exceeded" and "characters" in err["message"], err
    grown = (proc.memory_info().rss - before) / 2**20
    print(f"server RSS grew {grown:.0f} MiB")
    assert grown < 200  # tokenizing 7 M characters would take GBs; parsing the body takes tens of MiB
    assert httpx.get(f"{server.base}/healthz", timeout=10).status_code == 200


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_an_integer_of_4300_digits_is_a_400(server: ServeProc, path: str) -> None:
    digits = "9" * 4301
    raw = (f'{{"model": "{MODEL}", "prompt": "hi", "messages": [{{"role": "user", "content": "hi"}}], '
           f'"max_tokens": 1, "seed": {digits}}}').encode()  # fmt: skip
    r = httpx.post(f"{server.base}{path}", content=raw, headers={**KEY, "Content-Type": "application/json"}, timeout=30)
    err = r.json()["error"]
    assert r.status_code == 400 and err["code"] == "invalid_json" and "4300 digits" in err["message"], r.text


def test_an_integer_of_4300_digits_in_a_join_is_a_400(cluster: ServeProc) -> None:
    raw = b'{"id": "w1", "load": 0, "free_memory_bytes": ' + b"1" * 5000 + b"}"
    r = httpx.post(f"{cluster.base}/noodle/cluster/heartbeat", content=raw, timeout=30,
                   headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"})  # fmt: skip
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json", r.text


def _count(base: str, endpoint: str, status: int) -> float:
    text = httpx.get(f"{base}/metrics", timeout=10).text
    line = f'noodle_requests_total{{endpoint="{endpoint}",status="{status}"}} '
    return sum(float(row.removeprefix(line)) for row in text.splitlines() if row.startswith(line))


def test_a_client_leaving_mid_body_is_a_quiet_log_line(server: ServeProc) -> None:
    before_log = len(server.log())
    before = _count(server.base, "/v1/completions", 499)
    with connect(server.base) as sock:
        sock.sendall(request_head("POST", "/v1/completions", {**KEY, "Content-Type": "application/json",
                                                              "Content-Length": "1000"}) + b'{"model": "')  # fmt: skip
        time.sleep(0.2)  # the server is waiting for the rest of the body
    deadline = time.monotonic() + 30
    while _count(server.base, "/v1/completions", 499) == before and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _count(server.base, "/v1/completions", 499) == before + 1  # seen as a client that left, not a 500
    assert _count(server.base, "/v1/completions", 500) == 0
    tail = server.log()[before_log:]
    assert "Traceback" not in tail and "unhandled error" not in tail, tail
    assert httpx.get(f"{server.base}/healthz", timeout=10).status_code == 200


def _get(base: str, path: str, headers: dict[str, str]) -> tuple[int, dict[str, str], bytes]:
    with connect(base) as sock:
        sock.sendall(request_head("GET", path, headers))
        reply = read_reply(sock)
    return reply.status, reply.headers, reply.body


def test_host_must_name_this_server(server: ServeProc) -> None:
    port = server.base.rsplit(":", 1)[1]
    for host in ("127.0.0.1", f"127.0.0.1:{port}", f"localhost:{port}", "LOCALHOST", f"[::1]:{port}"):
        assert _get(server.base, "/healthz", {"Host": host})[0] == 200, host
    for host in ("evil.example", f"evil.example:{port}", f"127.0.0.1.evil.example:{port}"):  # DNS rebinding
        status, _, body = _get(server.base, "/healthz", {"Host": host})
        assert status == 400 and b"--allow-host" in body, (host, body)
        assert _get(server.base, "/v1/models", {"Host": host, **KEY})[0] == 400


def test_a_foreign_page_cannot_post(server: ServeProc) -> None:
    body = f'{{"model": "{MODEL}", "prompt": "hi", "max_tokens": 1}}'
    simple = {"Content-Type": "text/plain", **KEY}  # a "simple" request: browsers send it without a preflight
    r = httpx.post(f"{server.base}/v1/completions", content=body, headers={**simple, "Origin": "http://evil.example"})
    assert r.status_code == 403 and r.json()["error"]["code"] == "cross_origin", r.text
    r = httpx.post(f"{server.base}/v1/completions", content=body, headers={**simple, "Origin": "null"})
    assert r.status_code == 403, r.text
    own = server.base.replace("127.0.0.1", "localhost")
    r = httpx.post(f"{server.base}/v1/completions", content=body, headers={**simple, "Origin": own}, timeout=60)
    assert r.status_code == 200, r.text  # this server's own page (the status page's origin)


def test_allow_host_and_allow_origin_flags(model_dir: Path, plan_file: Path) -> None:
    args = ["--model", str(model_dir), "--plan", str(plan_file), "--allow-host", "box.lan",
            "--allow-origin", "https://chat.example"]  # fmt: skip
    with start_serve(args) as sp:
        assert _get(sp.base, "/healthz", {"Host": "box.lan:8000"})[0] == 200
        assert _get(sp.base, "/healthz", {"Host": "other.lan"})[0] == 400
        pre = httpx.options(f"{sp.base}/v1/completions", headers={"Origin": "https://chat.example",
                            "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "content-type"})  # fmt: skip
        assert pre.status_code == 200 and pre.headers["access-control-allow-origin"] == "https://chat.example"
        body = {"model": MODEL, "prompt": "hi", "max_tokens": 1}
        r = httpx.post(f"{sp.base}/v1/completions", json=body, headers={"Origin": "https://chat.example"}, timeout=60)
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "https://chat.example", r.text
        r = httpx.post(f"{sp.base}/v1/completions", json=body, headers={"Origin": "https://other.example"}, timeout=60)
        assert r.status_code == 403


def test_cluster_views_need_the_key_or_the_token(cluster: ServeProc, model_dir: Path) -> None:
    from noodle.serve.joining import model_hash, weights_hash

    from .test_registry import _body

    body = {**_body("w1", 0.6), "model_hash": model_hash(model_dir), "weights_sha256": weights_hash(model_dir)}
    joined = httpx.post(f"{cluster.base}/noodle/cluster/join", json=body,
                        headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30)  # fmt: skip
    assert joined.status_code == 200, joined.text
    address = _body("w1", 0.6)["address"]
    for path in ("/noodle/cluster", "/noodle/cluster/export"):
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            r = httpx.get(f"{cluster.base}{path}", headers=headers, timeout=30)
            assert r.status_code == 401 and address not in r.text, (path, r.text)
        for secret in (API_KEY, TOKEN):
            r = httpx.get(f"{cluster.base}{path}", headers={"Authorization": f"Bearer {secret}"}, timeout=30)
            assert r.status_code in (200, 409) and r.status_code != 401, (path, r.text)  # 409: no live worker to export
    assert address in httpx.get(f"{cluster.base}/noodle/cluster", headers=KEY, timeout=30).text
    status = httpx.get(f"{cluster.base}/noodle/status", timeout=30).json()  # the open status page's data
    assert [n["address"] for n in status["cluster"]["nodes"]] == ["(hidden)"]
    status = httpx.get(f"{cluster.base}/noodle/status", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30).json()
    assert [n["address"] for n in status["cluster"]["nodes"]] == [address]

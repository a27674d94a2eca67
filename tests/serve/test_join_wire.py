"""The join body on the wire: per-unit cost reports are validated at the edge (400 naming the field, never a 500)."""

from __future__ import annotations

import copy
import json
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from .test_registry import NAMES, _body

TOKEN = "wire-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
WEIRD: list[Any] = [None, True, -1, 0, 10**40, 1e308, "", "x" * 5000, [], [None], {}, {"1": -1}, "NaN", [2**70]]


@pytest.fixture(scope="module")
def client(model_dir: Path, tokenizer: Any) -> Iterator[tuple[TestClient, Any]]:
    from noodle.serve.build import build_cluster_server
    from noodle.serve.joining import model_hash, weights_hash

    served = build_cluster_server(model_dir, tokenizer, token=TOKEN, min_workers=1000)
    with TestClient(served.app, base_url="http://127.0.0.1", raise_server_exceptions=False) as tc:  # no lifespan: nothing is planned
        yield tc, (model_hash(model_dir), weights_hash(model_dir))
        served.cluster.close()


def _valid(hashes: tuple[str, str], node: str = "w1") -> dict[str, Any]:
    return {**_body(node, 0.6), "model_hash": hashes[0], "weights_sha256": hashes[1]}


def _post(tc: TestClient, body: Any) -> Any:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return tc.post("/noodle/cluster/join", content=raw, headers={**AUTH, "content-type": "application/json"})


def test_a_valid_report_joins(client: tuple[TestClient, Any]) -> None:
    tc, mhash = client
    resp = _post(tc, _valid(mhash))
    assert resp.status_code == 200, resp.text
    nodes = tc.get("/noodle/cluster", headers=AUTH).json()["nodes"]
    assert [(n["id"], n["units"]) for n in nodes] == [("w1", len(NAMES))]
    assert nodes[0]["decode_ms"] == pytest.approx(0.6)


def _unit_edit(mhash: str, key: str, value: Any, index: int = 2) -> dict[str, Any]:
    body = _valid(mhash)
    body["costs"]["units"][index][key] = value
    return body


@pytest.mark.parametrize(("edit", "field", "words"), [
    (lambda b: b["costs"].update(units=b["costs"]["units"][:5]), "costs.units", "5 units measured, the coordinator's model has 6"),
    (lambda b: b["costs"]["units"][1].update(name="block.9"), "costs.units", "units[1].name is 'block.9'"),
    (lambda b: b["costs"].update(units=b["costs"]["units"] * 300), "costs.units", "at most 1024"),
    (lambda b: b["costs"]["units"][2].update(decode_ms={"1": -0.5}), "costs.units.2.decode_ms.1",
     "greater than or equal to 0.001, got -0.5"),
    (lambda b: b["costs"]["units"][2].update(decode_ms={"1": 1e-9}), "costs.units.2.decode_ms.1",
     "greater than or equal to 0.001, got 1e-09"),
    (lambda b: b["device"].update(total_memory_bytes=8 * 2**50), "device.total_memory_bytes",
     "less than or equal to 1125899906842624, got 9007199254740992 (8 PiB)"),
    (lambda b: b["device"].update(free_memory_bytes=9 * 2**30), "device.free_memory_bytes",
     "9663676416 free is more than the 8589934592 total_memory_bytes"),
    (lambda b: b["costs"]["units"][2].update(decode_ms={str(i): 1.0 for i in range(1, 40)}), "costs.units.2.decode_ms",
     "at most 16"),
    (lambda b: b["costs"]["units"][3].update(decode_ms={"1": 1.0, "4": 2.0}), "costs", "differ from units[0]'s [1]"),
    (lambda b: b["costs"]["units"][0].update(prefill_ms_per_token=0), "costs.units.0.prefill_ms_per_token",
     "greater than or equal to 0.000001, got 0"),
    (lambda b: b["costs"]["units"][0].update(param_bytes=2**60), "costs.units.0.param_bytes", "less than or equal"),
    (lambda b: b["costs"].update(format="noodle.unit-costs/9"), "costs.format", "noodle.unit-costs/1"),
    (lambda b: b.update(costs={"decode_ms": 3.0, "prefill_ms_per_token": 0.1, "prompt_tokens": 32}), "costs",
     "older noodle worker"),
])  # fmt: skip
def test_bad_reports_are_one_line_400s_naming_the_field(client: tuple[TestClient, Any], edit: Any, field: str,
                                                          words: str) -> None:  # fmt: skip
    tc, mhash = client
    body = copy.deepcopy(_valid(mhash, "bad"))
    edit(body)
    resp = _post(tc, body)
    assert resp.status_code == 400, resp.text
    err = resp.json()["error"]
    assert err["message"].startswith(f"{field}: ") and words in err["message"] and "\n" not in err["message"], err


def test_nan_and_infinity_are_refused(client: tuple[TestClient, Any]) -> None:
    tc, mhash = client
    for literal in (b"NaN", b"Infinity", b"-Infinity"):
        raw = json.dumps(_unit_edit(mhash, "prefill_ms_per_token", 12345.5))
        assert raw.count("12345.5") == 1
        resp = _post(tc, raw.replace("12345.5", literal.decode()).encode())
        assert resp.status_code == 400, resp.text
        assert "prefill_ms_per_token" in resp.json()["error"]["message"]


def test_fuzzed_reports_never_500(client: tuple[TestClient, Any]) -> None:
    tc, mhash = client
    rng = random.Random(0)
    paths = [("costs", k) for k in ("format", "batch_size", "prompt_tokens", "dtype", "units")]
    paths += [("unit", k) for k in ("name", "decode_ms", "prefill_ms_per_token", "param_bytes", "kv_bytes_per_token")]
    paths += [("device", k) for k in ("kind", "total_memory_bytes", "threads")] + [("top", "costs"), ("top", "id")]
    seen = set()
    for where, key in paths:
        for value in rng.sample(WEIRD, 6):
            body = _valid(mhash, "fuzz")
            target = {"costs": body["costs"], "unit": body["costs"]["units"][rng.randrange(len(NAMES))],
                      "device": body["device"], "top": body}[where]  # fmt: skip
            target[key] = value
            resp = _post(tc, body)
            seen.add(resp.status_code)
            assert resp.status_code in (200, 400, 409, 422), (where, key, value, resp.status_code, resp.text)
            assert resp.status_code == 200 or "error" in resp.json()
    assert 400 in seen


def test_other_weights_with_the_same_config_and_sizes_are_refused(client: tuple[TestClient, Any]) -> None:
    tc, hashes = client
    body = {**_valid(hashes, "other-weights"), "weights_sha256": "ab" * 32}
    resp = _post(tc, body)
    err = resp.json()["error"]
    assert resp.status_code == 409 and err["code"] == "weights_mismatch", resp.text
    assert err["message"].startswith("weights_sha256: the worker's weights hash to abababababababab..., the "
                                     f"coordinator's to {hashes[1][:16]}...: same config and file sizes, other weights")


def test_a_heartbeat_needs_its_own_nodes_secret(client: tuple[TestClient, Any]) -> None:
    tc, hashes = client
    secrets = {}
    for node in ("hb1", "hb2"):
        resp = _post(tc, _valid(hashes, node))
        assert resp.status_code == 200, resp.text
        secrets[node] = resp.json()["secret"]

    def beat(node: str, secret: str | None, free: int = 2**30) -> Any:
        body = {"id": node, "load": 0.1, "free_memory_bytes": free, **({"secret": secret} if secret else {})}
        return tc.post("/noodle/cluster/heartbeat", json=body, headers=AUTH)

    assert beat("hb1", secrets["hb1"]).status_code == 200
    for secret in (secrets["hb2"], None, "x" * 32):  # another node's secret, none, a guess
        resp = beat("hb1", secret, free=10**15)
        assert resp.status_code == 403 and resp.json()["error"]["param"] == "secret", resp.text
    resp = beat("hb1", secrets["hb1"], free=10**40)
    assert resp.status_code == 400 and "free_memory_bytes: Input should be less than or equal to" in resp.text
    nodes = {n["id"]: n for n in tc.get("/noodle/cluster", headers=AUTH).json()["nodes"]}
    assert nodes["hb1"]["free_memory_bytes"] == 2**30 and "secret" not in nodes["hb1"]
    resp = _post(tc, _valid(hashes, "hb1"))  # the live name is not taken over
    assert resp.status_code == 409 and resp.json()["error"]["code"] == "name_in_use", resp.text


def test_leave_needs_the_nodes_secret_and_a_valid_body(client: tuple[TestClient, Any]) -> None:
    tc, hashes = client
    secrets = {}
    for node in ("lv1", "lv2"):
        resp = _post(tc, _valid(hashes, node))
        assert resp.status_code == 200, resp.text
        secrets[node] = resp.json()["secret"]

    def leave(body: Any, auth: dict[str, str] = AUTH) -> Any:
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        return tc.post("/noodle/cluster/leave", content=raw, headers={**auth, "content-type": "application/json"})

    assert leave({"id": "lv1", "secret": secrets["lv1"]}, auth={}).status_code == 401
    for secret in (secrets["lv2"], "", "x" * 32):  # another node's secret, none, a guess: lv1 stays
        resp = leave({"id": "lv1", "secret": secret, "wait_s": 0})
        assert resp.status_code == 403 and resp.json()["error"]["param"] == "secret", resp.text
    bodies: list[Any] = [b"{", b"", [], {"secret": secrets["lv1"]},
                         *({"id": "lv1", "secret": secrets["lv1"], "wait_s": w} for w in (-1, 601, "soon", None, [1])),
                         *({"id": v, "secret": "s"} for v in WEIRD if not isinstance(v, str) or not v)]
    for body in bodies:
        resp = leave(body)
        assert resp.status_code == 400, (body, resp.text)
        assert "Traceback" not in resp.text and resp.json()["error"]["message"]
    alive = {n["id"]: n["alive"] for n in tc.get("/noodle/cluster", headers=AUTH).json()["nodes"]}
    assert alive["lv1"] and alive["lv2"]
    resp = leave({"id": "lv1", "secret": secrets["lv1"], "wait_s": 0})  # no plan is served: answered at once
    assert resp.status_code == 200 and resp.json()["left"] and not resp.json()["in_plan"], resp.text
    assert leave({"id": "lv1", "secret": secrets["lv1"], "wait_s": 0}).json()["left"] is False  # once
    assert leave({"id": "nobody", "secret": "s", "wait_s": 0}).json()["left"] is False
    alive = {n["id"]: n["alive"] for n in tc.get("/noodle/cluster", headers=AUTH).json()["nodes"]}
    assert not alive["lv1"] and alive["lv2"]
    assert _post(tc, _valid(hashes, "lv1")).status_code == 200  # its name is free again at once: a restarted pod

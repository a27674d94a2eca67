"""Bad deployment files: one line that names the field, from the library and from ``noodle deploy kubernetes``."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from noodle.cli.main import main
from noodle.deploy import parse_deployment, render
from noodle.errors import SpecError

kv = pytest.importorskip("kubernetes_validate")

ROOT = Path(__file__).resolve().parents[2]
BASE: dict[str, Any] = yaml.safe_load((ROOT / "deploy/examples/gpu-cpu.yaml").read_text())


def _with(path: str, value: Any) -> dict[str, Any]:
    """BASE with the value at a dotted path (``pools.0.replicas``) replaced; ``...`` deletes it."""
    doc = copy.deepcopy(BASE)
    *parents, last = [int(p) if p.isdigit() else p for p in path.split(".")]
    node: Any = doc
    for p in parents:
        node = node[p]
    if value is ...:
        del node[last]
    else:
        node[last] = value
    return doc


BAD = [
    ("imagee", "x", "d.yaml: imagee: unknown key (check the spelling; see deploy/deployment.schema.json)"),
    ("image", ..., "d.yaml: image: required key is missing"),
    ("image", "my image", "d.yaml: image: 'my image' is not an image reference"),
    ("name", "Noodle", "d.yaml: name: 'Noodle' is not a valid name"),
    ("name", "n" * 53, "d.yaml: name: "),
    ("pools", [], "d.yaml: pools: List should have at least 1 item"),
    ("pools.0.replicas", -1, "d.yaml: pools[0].replicas: Input should be greater than or equal to 0 (got -1)"),
    ("pools.0.replicas", "2", "d.yaml: pools[0].replicas: Input should be a valid integer (got '2')"),
    ("pools.1.device", "tpu", "d.yaml: pools[1].device: Input should be 'cpu' or 'cuda' (got 'tpu')"),
    ("pools.1.name", "gpu", "d.yaml: pools: two pools are named 'gpu'"),
    ("pools.0.name", "GPU_pool", "d.yaml: pools[0].name: 'GPU_pool' is not a valid pool name"),
    ("pools.0.resources.requests.cpu", "2 cores", "d.yaml: pools[0].resources.requests.cpu: '2 cores' is not a "
                                                  "Kubernetes quantity"),
    ("pools.0.resources.requests.memory", "32Gi", "d.yaml: pools[0].resources: requests.memory 32Gi is more than "
                                                  "limits.memory 16Gi"),
    ("pools.0.resources.limits.cpu", "0", "d.yaml: pools[0].resources.limits.cpu: must be more than 0"),
    ("pools.0.tolerations.0.value", "x", "d.yaml: pools[0].tolerations[0]: operator Exists takes no value"),
    ("pools.0.tolerations.0.key", "gpu please", "d.yaml: pools[0].tolerations[0]: label key 'gpu please'"),
    ("pools.0.tolerations.0.effect", "NoRun", "d.yaml: pools[0].tolerations[0].effect: Input should be"),
    ("pools.0.node_selector", {"bad key!": "x"}, "d.yaml: pools[0].node_selector: label key 'bad key!'"),
    ("pools.0.threads", 2.5, "d.yaml: pools[0].threads: Input should be a valid integer"),
    ("model.host_path", "/srv/models", "d.yaml: model: give exactly one of claim"),
    ("model.folder", "../etc", "d.yaml: model: folder must be a relative path inside the volume"),
    ("model.mount_path", "models", "d.yaml: model: mount_path must be an absolute folder"),
    ("secrets.token", ..., "d.yaml: secrets.token: required key is missing"),
    ("secrets.api_key", "API", "d.yaml: secrets.api_key: 'API' is not a valid Secret name"),
    ("worker_port", 70000, "d.yaml: worker_port: Input should be less than or equal to 65535 (got 70000)"),
    ("coordinator.min_workers", 6, "d.yaml: pools: coordinator.min_workers 6 is more than the pools' 5 replicas"),
    ("coordinator.heartbeat_timeout_s", "5", "d.yaml: coordinator.heartbeat_timeout_s: Input should be a valid number"),
    ("coordinator.heartbeat_timeout_s", float("nan"), "d.yaml: coordinator.heartbeat_timeout_s:"),
    ("coordinator.service_type", "Ingress", "d.yaml: coordinator.service_type: Input should be"),
]


@pytest.mark.parametrize(("path", "value", "message"), BAD, ids=[b[0] + "=" + repr(b[1])[:12] for b in BAD])
def test_a_bad_field_is_one_line_naming_it(path: str, value: Any, message: str) -> None:
    with pytest.raises(SpecError) as info:
        parse_deployment(_with(path, value), "d.yaml")
    text = str(info.value)
    assert text.startswith(message), text
    assert "\n" not in text


def test_the_base_document_is_valid_and_defaults_fill_in() -> None:
    dep = parse_deployment(BASE, "d.yaml")
    assert dep.min_workers == 5 and dep.coordinator.port == 8000 and dep.worker_port == 50051
    assert [p.gpu_count for p in dep.pools] == [1, 0]
    assert dep.model.path == "/models/gpt2"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("- a\n- b\n", "a deployment file is a mapping"),
        ("name: [unclosed\n", "line 2: not valid YAML/JSON"),
        ("name: a\nname: b\n", "line 2: duplicate key 'name'"),
        ("", "a deployment file is a mapping (name, image, model, secrets, pools), got NoneType"),
    ],
)
def test_the_cli_says_one_line_and_exits_2(text: str, message: str, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    path = tmp_path / "d.yaml"
    path.write_text(text)
    assert main(["deploy", "kubernetes", str(path)]) == 2
    cap = capsys.readouterr()
    assert cap.out == ""
    err = cap.err.strip()
    assert err.startswith(f"noodle: error: {path}: ") and message in err and "\n" not in err, err


def _leaves(doc: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    if isinstance(doc, dict):
        return [leaf for k, v in doc.items() for leaf in _leaves(v, (*prefix, k))]
    if isinstance(doc, list):
        return [leaf for i, v in enumerate(doc) for leaf in _leaves(v, (*prefix, i))]
    return [prefix]


LEAVES = _leaves(BASE)
JUNK = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(), st.text(max_size=80),
                 st.lists(st.integers(), max_size=3), st.dictionaries(st.text(max_size=5), st.integers(), max_size=2))  # fmt: skip


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.sampled_from(LEAVES), JUNK), min_size=1, max_size=3))
def test_fuzzed_files_render_or_fail_in_one_line(edits: list[tuple[tuple[Any, ...], Any]]) -> None:
    doc = copy.deepcopy(BASE)
    for path, value in edits:
        node = doc
        for p in path[:-1]:
            node = node[p]
        node[path[-1]] = value
    try:
        dep = parse_deployment(doc, "d.yaml")
    except SpecError as exc:
        text = str(exc)
        assert text.startswith("d.yaml: ") and "\n" not in text, text
        return
    for obj in render(dep):  # what validates renders objects the Kubernetes schema accepts
        kv.validate(obj, kv.latest_version(), strict=True)

"""``noodle deploy kubernetes``: every example renders objects the Kubernetes API schema accepts, wired together.

The schema check is offline: ``kubernetes-validate`` ships the OpenAPI-derived JSON schemas of each release
(strict: unknown fields are errors). The containers' command lines are parsed by the real CLI, so a flag the
manifests use and ``noodle serve``/``noodle worker`` do not know fails here, not in a pod.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import typer
import yaml

from noodle.cli.main import app, main
from noodle.deploy import load_deployment, render, to_yaml
from noodle.deploy.kubernetes import API_KEY_KEY, TOKEN_DIR, TOKEN_KEY
from noodle.deploy.model import deployment_json_schema

kv = pytest.importorskip("kubernetes_validate")

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "deploy" / "examples").glob("*.yaml"))
# The newest schemas the package ships, and an older release still in wide use.
VERSIONS = (kv.latest_version(), "1.30.0")


def _objects(path: Path) -> list[dict[str, Any]]:
    return render(load_deployment(path))


def _of(objects: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] == kind]


def _container(obj: dict[str, Any]) -> dict[str, Any]:
    (container,) = obj["spec"]["template"]["spec"]["containers"]
    return container


def _matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def test_the_three_examples_are_there() -> None:
    assert [p.name for p in EXAMPLES] == ["cpu-only.yaml", "gpu-cpu.yaml", "three-pools.yaml"]


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_every_object_validates_against_the_kubernetes_schema(path: Path, version: str) -> None:
    objects = _objects(path)
    kinds = {o["kind"] for o in objects}
    assert kinds == {"Service", "Deployment", "StatefulSet", "PodDisruptionBudget", "NetworkPolicy"}
    for obj in objects:
        # what kubectl would read: the YAML text, not the dicts
        kv.validate(obj, version, strict=True)
    for obj in yaml.safe_load_all(to_yaml(objects)):
        kv.validate(obj, version, strict=True)


def test_the_schema_check_is_not_a_formality() -> None:
    obj = _of(_objects(ROOT / "deploy/examples/cpu-only.yaml"), "StatefulSet")[0]
    _container(obj)["resources"]["limits"]["cpu"] = {"cores": 1}
    with pytest.raises(kv.ValidationError):
        kv.validate(obj, VERSIONS[0], strict=True)
    obj = _of(_objects(ROOT / "deploy/examples/cpu-only.yaml"), "Deployment")[0]
    obj["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}  # a typo: strict schemas refuse it
    with pytest.raises(kv.ValidationError):
        kv.validate(obj, VERSIONS[0], strict=True)


def _parse(command: str, args: list[str]) -> dict[str, Any]:
    """Parse ``args`` with the real command's parser (types converted, unknown flags refused)."""
    cmd = typer.main.get_command(app).commands[command]  # type: ignore[attr-defined]
    with cmd.make_context(command, list(args), resilient_parsing=False) as ctx:
        return dict(ctx.params)


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_the_rendered_command_lines_parse_with_the_real_cli(path: Path) -> None:
    dep = load_deployment(path)
    objects = render(dep)
    (coordinator,) = _of(objects, "Deployment")
    c = _container(coordinator)
    assert c["command"] == ["noodle"] and c["args"][0] == "serve"
    params = _parse("serve", c["args"][1:])
    assert params["cluster"] is True
    assert params["min_workers"] == dep.min_workers
    assert params["port"] == dep.coordinator.port == c["ports"][0]["containerPort"]
    assert str(params["token_file"]) == f"{TOKEN_DIR}/{TOKEN_KEY}"
    assert params["token"] is None
    assert [str(m) for m in params["model"]] == [f"{dep.model.mount_path.rstrip('/')}/{dep.model.folder}"]
    for sts, pool in zip(_of(objects, "StatefulSet"), dep.pools, strict=True):
        w = _container(sts)
        assert w["command"] == ["noodle"] and w["args"][0] == "worker"
        params = _parse("worker", w["args"][1:])
        assert params["device"] == pool.device
        assert params["name"] == "$(POD_NAME)" and params["advertise"] == f"$(POD_IP):{dep.worker_port}"
        assert params["port"] == dep.worker_port == w["ports"][0]["containerPort"]
        assert params["threads"] == pool.threads
        assert str(params["token_file"]) == f"{TOKEN_DIR}/{TOKEN_KEY}"
        # ready once joined (the readiness probe tests the file), and a stop is a leave within the grace period
        probe = w["readinessProbe"]["exec"]["command"]
        assert probe == ["test", "-f", str(params["ready_file"])]
        assert 0 < params["leave_timeout"] < sts["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] - 5
        # the variables the args use are the pod's own name and IP
        env = {e["name"]: e.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") for e in w["env"]}
        assert env["POD_NAME"] == "metadata.name" and env["POD_IP"] == "status.podIP"


def test_an_unknown_flag_would_be_caught() -> None:
    # typer may bundle its own copy of click: the parser's error is recognised by name
    with pytest.raises(Exception) as info:  # noqa: PT011
        _parse("worker", ["--model", "/m", "--no-such-flag", "1"])
    assert type(info.value).__name__ == "NoSuchOption"
    with pytest.raises(Exception) as info:  # noqa: PT011
        _parse("worker", ["--model", "/m", "--port", "$(POD_PORT)"])
    assert type(info.value).__name__ == "BadParameter"


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_the_objects_are_wired_together(path: Path) -> None:
    dep = load_deployment(path)
    objects = render(dep)
    api, joins, headless = _of(objects, "Service")
    (coordinator,) = _of(objects, "Deployment")
    pools = _of(objects, "StatefulSet")
    pdbs = _of(objects, "PodDisruptionBudget")
    (policy,) = _of(objects, "NetworkPolicy")
    coord_labels = coordinator["spec"]["template"]["metadata"]["labels"]
    worker_labels = [s["spec"]["template"]["metadata"]["labels"] for s in pools]

    assert coordinator["spec"]["replicas"] == 1 and coordinator["spec"]["strategy"] == {"type": "Recreate"}
    assert _matches(coordinator["spec"]["selector"]["matchLabels"], coord_labels)
    # clients reach only a ready coordinator; workers reach it before it is ready (it waits for them)
    assert _matches(api["spec"]["selector"], coord_labels) and not api["spec"].get("publishNotReadyAddresses")
    assert _matches(joins["spec"]["selector"], coord_labels) and joins["spec"]["publishNotReadyAddresses"] is True
    join_url = f"http://{joins['metadata']['name']}:{joins['spec']['ports'][0]['port']}"
    assert headless["spec"]["clusterIP"] == "None"
    assert not any(_matches(s["spec"]["selector"], coord_labels) for s in (headless,))
    c = _container(coordinator)
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz" and c["livenessProbe"]["httpGet"]["path"] == "/healthz"

    assert len(pools) == len(pdbs) == len(dep.pools)
    for sts, pdb, labels, pool in zip(pools, pdbs, worker_labels, dep.pools, strict=True):
        spec = sts["spec"]
        assert sts["metadata"]["name"] == f"{dep.name}-{pool.name}" and spec["replicas"] == pool.replicas
        assert spec["serviceName"] == headless["metadata"]["name"] and _matches(headless["spec"]["selector"], labels)
        assert _matches(spec["selector"]["matchLabels"], labels) and _matches(pdb["spec"]["selector"]["matchLabels"], labels)
        assert pdb["spec"]["maxUnavailable"] == 1
        # one pool's selector never takes another pool's pods
        assert sum(_matches(spec["selector"]["matchLabels"], other) for other in worker_labels) == 1
        w = _container(sts)
        assert w["args"][w["args"].index("--join") + 1] == join_url
        limits = w.get("resources", {}).get("limits", {})
        assert ("nvidia.com/gpu" in limits) == (pool.device == "cuda")
        if pool.device == "cuda":
            assert limits["nvidia.com/gpu"] == "1"
        assert w["image"] == (pool.image or dep.image)
        assert spec["template"]["spec"].get("nodeSelector", {}) == pool.node_selector
        assert len(spec["template"]["spec"].get("tolerations", [])) == len(pool.tolerations)

    # the workers' gRPC port: only from the coordinator and the other workers
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    assert all(_matches(policy["spec"]["podSelector"]["matchLabels"], labels) for labels in worker_labels)
    assert not _matches(policy["spec"]["podSelector"]["matchLabels"], coord_labels)
    (rule,) = policy["spec"]["ingress"]
    assert rule["ports"] == [{"protocol": "TCP", "port": dep.worker_port}]
    peers = [p["podSelector"]["matchLabels"] for p in rule["from"]]
    assert any(_matches(p, coord_labels) for p in peers) and all(any(_matches(p, w) for p in peers) for w in worker_labels)
    assert not any(_matches(p, {"app.kubernetes.io/instance": "someone-else"}) for p in peers)


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_secrets_are_files_or_references_never_values(path: Path) -> None:
    dep = load_deployment(path)
    text = to_yaml(render(dep))
    assert "kind: Secret\n" not in text
    for obj in _of(render(dep), "Deployment") + _of(render(dep), "StatefulSet"):
        pod = obj["spec"]["template"]["spec"]
        token = next(v for v in pod["volumes"] if v["name"] == "token")
        assert token["secret"]["secretName"] == dep.secrets.token
        container = _container(obj)
        assert {"name": "token", "mountPath": TOKEN_DIR, "readOnly": True} in container["volumeMounts"]
        for env in container["env"]:
            assert "TOKEN" not in env["name"]
            assert "value" not in env or env["name"] == "HOME"
        assert container["securityContext"]["readOnlyRootFilesystem"] is True and pod["securityContext"]["runAsNonRoot"]
    env = {e["name"]: e for e in _container(_of(render(dep), "Deployment")[0])["env"]}
    if dep.secrets.api_key:
        assert env["NOODLE_API_KEY"]["valueFrom"]["secretKeyRef"] == {"name": dep.secrets.api_key, "key": API_KEY_KEY}
    else:
        assert "NOODLE_API_KEY" not in env


def test_the_cli_prints_yaml_and_json(capsys: pytest.CaptureFixture[str]) -> None:
    path = ROOT / "deploy/examples/gpu-cpu.yaml"
    assert main(["deploy", "kubernetes", str(path)]) == 0
    out = capsys.readouterr().out
    assert out == to_yaml(render(load_deployment(path)))
    assert list(yaml.safe_load_all(out)) == render(load_deployment(path))
    assert main(["deploy", "kubernetes", str(path), "--format", "json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert listed["kind"] == "List" and listed["items"] == render(load_deployment(path))


def test_deploy_does_not_import_torch() -> None:
    code = ("import sys\nfrom noodle.cli.main import main\n"
            f"rc = main(['deploy', 'kubernetes', {str(EXAMPLES[0])!r}])\n"
            "heavy = [m for m in ('torch', 'transformers', 'grpc') if m in sys.modules]\n"
            "assert rc == 0 and not heavy, (rc, heavy)\n")  # fmt: skip
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]


def test_the_committed_schema_is_current() -> None:
    committed = json.loads((ROOT / "deploy" / "deployment.schema.json").read_text())
    assert committed == deployment_json_schema(), "regenerate: python -m noodle.deploy.model > deploy/deployment.schema.json"

"""The Helm chart under deploy/helm/noodle renders the objects `noodle deploy kubernetes` renders.

Its values are a deployment file: the defaults are deploy/examples/gpu-cpu.yaml, and with any example as its
values the chart gives the same objects as the Python renderer. Rendered by Helm's own engine (its Go SDK,
through the ``helm-python-sdk`` bindings: no cluster, no helm binary); skipped where that is not installed.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

from noodle.deploy import load_deployment, parse_deployment, render

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "deploy" / "helm" / "noodle"
EXAMPLES = sorted((ROOT / "deploy" / "examples").glob("*.yaml"))


def _by_name(objects: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    named = {(o["kind"], o["metadata"]["name"]): o for o in objects}
    assert len(named) == len(objects), "two objects of one kind share a name"
    return named


def test_the_default_values_are_the_gpu_cpu_example() -> None:
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert values == yaml.safe_load((ROOT / "deploy/examples/gpu-cpu.yaml").read_text())
    assert parse_deployment(values, "values.yaml") == load_deployment(ROOT / "deploy/examples/gpu-cpu.yaml")


def test_the_values_schema_is_the_deployment_schema() -> None:
    assert json.loads((CHART / "values.schema.json").read_text()) == json.loads(
        (ROOT / "deploy" / "deployment.schema.json").read_text())


def _helm_render(chart: Path, values: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    helm = pytest.importorskip("helm_python")
    with helm.Chart.load(str(chart)) as loaded:
        out = loaded.render(values, name="noodle", namespace="default")
    return [o for text in out.values() for o in yaml.safe_load_all(text) if o]


def test_helm_lints_the_chart_without_errors() -> None:
    helm = pytest.importorskip("helm_python")
    report = helm.lint(str(CHART), strict=True)
    assert report["errors"] == []
    assert [m for m in report["messages"] if m["severity"] > 1] == []  # 1: INFO ("icon is recommended")


def test_the_default_values_render_the_same_objects() -> None:
    got = _by_name(_helm_render(CHART))
    want = _by_name(render(load_deployment(ROOT / "deploy/examples/gpu-cpu.yaml")))
    assert sorted(got) == sorted(want)
    for key, obj in want.items():
        assert got[key] == obj, key


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.stem)
def test_every_example_as_values_renders_the_same_objects(example: Path, tmp_path: Path) -> None:
    chart = tmp_path / "noodle"
    shutil.copytree(CHART, chart)
    shutil.copy(example, chart / "values.yaml")  # the example alone, no defaults merged in from gpu-cpu
    got = _by_name(_helm_render(chart))
    want = _by_name(render(load_deployment(example)))
    assert sorted(got) == sorted(want)
    for key, obj in want.items():
        assert got[key] == obj, key


def test_helm_refuses_values_the_schema_refuses() -> None:
    helm = pytest.importorskip("helm_python")
    with helm.Chart.load(str(CHART)) as loaded:
        loaded.validate_schema(None)
        with pytest.raises(Exception, match="replicas"):  # noqa: PT011 - the bindings' own error type
            loaded.validate_schema({"pools": [{"name": "cpu", "replicas": "two"}]})

"""docs/grafana/noodle.json reads series a live ``noodle serve`` exports, and docs/serving.md lists only real ones.

After one request to the shared tiny-model server, ``/metrics`` is parsed with prometheus_client; every
metric name in every panel's PromQL (and the ``$model`` variable's ``label_values``) must be a sample
name in it, every exact label matcher must match a sample, and every ``{{label}}`` of a legend must be
a label of the series the panel reads.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import httpx
import openai
from prometheus_client.parser import text_string_to_metric_families

from .conftest import API_KEY
from .servers import ServeProc

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "docs" / "grafana" / "noodle.json"
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_SELECTOR = re.compile(r"([A-Za-z_:][A-Za-z0-9_:]*)\s*\{([^}]*)\}")
_MATCHER = re.compile(r'([A-Za-z_][A-Za-z0-9_]*)\s*(=~|!=|!~|=)\s*"([^"]*)"')
_IDENT = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*(\s*\()?")


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads (not its functions, aggregations, labels or ranges)."""
    s = _GROUPING.sub(" ", expr)
    s = re.sub(r"\{[^}]*\}|\[[^\]]*\]|\"[^\"]*\"", " ", s)
    return {m.group(0) for m in _IDENT.finditer(s) if not m.group(1)}


def selectors(expr: str) -> list[tuple[str, list[tuple[str, str, str]]]]:
    return [(m.group(1), _MATCHER.findall(m.group(2))) for m in _SELECTOR.finditer(expr)]


def scrape(base: str) -> list[Any]:
    text = httpx.get(f"{base}/metrics", timeout=30).text
    return [s for f in text_string_to_metric_families(text) for s in f.samples]


def test_expression_parsing() -> None:
    expr = 'histogram_quantile(0.99, sum by (le) (rate(vllm:ttft_bucket{model_name=~"$model"}[$__rate_interval])))'
    assert metric_names(expr) == {"vllm:ttft_bucket"}
    assert metric_names("a_total / b") == {"a_total", "b"}
    assert selectors('x{kind="measured", y!="z"}') == [("x", [("kind", "=", "measured"), ("y", "!=", "z")])]


def test_every_dashboard_series_is_exported_after_one_request(server: ServeProc) -> None:
    c = openai.OpenAI(base_url=f"{server.base}/v1", api_key=API_KEY, max_retries=0, timeout=120)
    c.completions.create(model="gpt2-tiny", prompt="One request", max_tokens=4, temperature=0)
    samples = scrape(server.base)
    by_name: dict[str, list[Any]] = {}
    for s in samples:
        by_name.setdefault(s.name, []).append(s)
    dash = json.loads(DASHBOARD.read_text())
    exprs: list[tuple[str, str]] = [(t["expr"], t.get("legendFormat", "")) for p in dash["panels"]
                                    for t in p.get("targets", [])]  # fmt: skip
    assert len(exprs) >= 15
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)) and all(p["gridPos"]["x"] + p["gridPos"]["w"] <= 24 for p in dash["panels"])
    used: set[str] = set()
    for expr, legend in exprs:
        names = metric_names(expr)
        assert names, expr
        for name in names:
            assert name in by_name, f"{name} (in {expr!r}) is not exported; exported: {sorted(by_name)}"
            used.add(name)
        for name, matchers in selectors(expr):
            for label, op, want in matchers:
                if op == "=":
                    assert any(s.labels.get(label) == want for s in by_name[name]), (expr, label, want)
                else:
                    assert all(label in s.labels for s in by_name[name]), (expr, label)
        for label in re.findall(r"\{\{\s*(\w+)\s*\}\}", legend):
            assert all(label in s.labels for n in names for s in by_name[n]), (expr, legend, label)
    for var in dash["templating"]["list"]:
        if var["type"] == "query":
            metric, label = re.fullmatch(r"label_values\(([^,]+),\s*(\w+)\)", var["definition"]).groups()  # type: ignore[union-attr]
            assert any(s.labels.get(label) == "gpt2-tiny" for s in by_name[metric]), var
    # vLLM's request series and noodle's pipeline series: per-stage compute and busy, per-link transfer,
    # predicted vs measured tokens/s, and the plan's optimality gap
    for want in ("vllm:time_to_first_token_seconds_bucket", "vllm:inter_token_latency_seconds_bucket",
                 "vllm:e2e_request_latency_seconds_bucket", "vllm:request_queue_time_seconds_bucket",
                 "vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
                 "vllm:prompt_tokens_total", "vllm:generation_tokens_total", "noodle_stage_step_ms",
                 "noodle_stage_busy_fraction", "noodle_stage_hop_ms", "noodle_stage_bytes_out_total",
                 "noodle_tokens_per_second", "noodle_plan_predicted_tokens_per_second", "noodle_plan_optimality_gap"):  # fmt: skip
        assert want in used, want
    gap = by_name["noodle_plan_optimality_gap"][0].value
    assert gap == 0.0  # the one-node plan's DP proves it optimal: objective == bound


def test_every_series_the_metrics_docs_list_is_exported(server: ServeProc) -> None:
    """Each metric the tables of docs/serving.md's Metrics section list (cluster series are docs/cluster.md's)."""
    text = (ROOT / "docs" / "serving.md").read_text()
    section = text[text.index("## Metrics"):text.index("\n## ", text.index("## Metrics") + 1)]
    rows = "\n".join(line for line in section.splitlines() if line.startswith("| `"))  # the tables' first column
    listed = set(re.findall(r"`((?:vllm:|noodle_)[a-z0-9_:]+)", rows))
    assert len(listed) >= 25, listed
    c = openai.OpenAI(base_url=f"{server.base}/v1", api_key=API_KEY, max_retries=0, timeout=120)
    c.completions.create(model="gpt2-tiny", prompt="One request", max_tokens=4, temperature=0)
    names = {s.name for s in scrape(server.base)}
    missing = sorted(n for n in listed if n not in names and not {f"{n}_bucket", f"{n}_total"} & names)
    assert not missing, missing

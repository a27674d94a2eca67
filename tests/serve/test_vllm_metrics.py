"""``/metrics`` read with prometheus_client's parser: vLLM's series beside noodle's, moved by real requests."""

from __future__ import annotations

from typing import Any

import httpx
import openai
from prometheus_client.parser import text_string_to_metric_families

from .conftest import API_KEY
from .servers import ServeProc

MODEL = "gpt2-tiny"

# Every vLLM-named series docs/serving.md lists, and its kind.
VLLM_SERIES = {
    "vllm:num_requests_running": "gauge",
    "vllm:num_requests_waiting": "gauge",
    "vllm:kv_cache_usage_perc": "gauge",
    "vllm:num_preemptions": "counter",
    "vllm:prompt_tokens": "counter",
    "vllm:generation_tokens": "counter",
    "vllm:request_success": "counter",
    "vllm:time_to_first_token_seconds": "histogram",
    "vllm:inter_token_latency_seconds": "histogram",
    "vllm:time_per_output_token_seconds": "histogram",
    "vllm:e2e_request_latency_seconds": "histogram",
    "vllm:request_queue_time_seconds": "histogram",
    "vllm:request_prompt_tokens": "histogram",
    "vllm:request_generation_tokens": "histogram",
}


def scrape(server: ServeProc) -> dict[str, Any]:
    text = httpx.get(f"{server.base}/metrics", timeout=10).text
    return {f.name: f for f in text_string_to_metric_families(text)}


def value(families: dict[str, Any], family: str, sample: str, **labels: str) -> float:
    found = [s.value for s in families[family].samples if s.name == sample and all(s.labels.get(k) == v
                                                                                     for k, v in labels.items())]
    assert len(found) == 1, (family, sample, labels, families[family].samples)
    return float(found[0])


def test_vllm_series_exist_and_count_a_request(server: ServeProc, tokenizer: Any) -> None:
    before = scrape(server)
    prompt = "Count these prompt tokens please"
    n_prompt = len(tokenizer(prompt)["input_ids"])
    c = openai.OpenAI(base_url=f"{server.base}/v1", api_key=API_KEY, max_retries=0, timeout=60)
    res = c.completions.create(model=MODEL, prompt=prompt, max_tokens=5, temperature=0)
    gen = res.usage.completion_tokens
    after = scrape(server)
    for name, kind in VLLM_SERIES.items():
        assert name in after and after[name].type == kind, name
        assert all(s.labels.get("model_name") == MODEL for s in after[name].samples if not s.name.endswith("_created"))

    def delta(family: str, sample: str, **labels: str) -> float:
        old = value(before, family, sample, model_name=MODEL, **labels) if family in before else 0.0
        return value(after, family, sample, model_name=MODEL, **labels) - old

    assert delta("vllm:prompt_tokens", "vllm:prompt_tokens_total") == n_prompt
    assert delta("vllm:generation_tokens", "vllm:generation_tokens_total") == gen
    reason = res.choices[0].finish_reason
    assert delta("vllm:request_success", "vllm:request_success_total", finished_reason=reason) == 1
    for hist in ("vllm:time_to_first_token_seconds", "vllm:e2e_request_latency_seconds",
                 "vllm:request_queue_time_seconds", "vllm:request_prompt_tokens"):  # fmt: skip
        assert delta(hist, f"{hist}_count") == 1, hist
    assert delta("vllm:inter_token_latency_seconds", "vllm:inter_token_latency_seconds_count") == gen - 1
    assert delta("vllm:request_prompt_tokens", "vllm:request_prompt_tokens_sum") == n_prompt
    assert delta("vllm:request_generation_tokens", "vllm:request_generation_tokens_sum") == gen
    e2e = delta("vllm:e2e_request_latency_seconds", "vllm:e2e_request_latency_seconds_sum")
    ttft = delta("vllm:time_to_first_token_seconds", "vllm:time_to_first_token_seconds_sum")
    assert 0 < ttft <= e2e
    buckets = [s.labels["le"] for s in after["vllm:time_to_first_token_seconds"].samples if s.name.endswith("_bucket")]
    assert buckets[:3] == ["0.001", "0.005", "0.01"] and buckets[-1] == "+Inf"
    # noodle's own series move with them (issue 20: noodle_prompt_tokens_total never moved before)
    assert value(after, "noodle_prompt_tokens", "noodle_prompt_tokens_total") - \
        value(before, "noodle_prompt_tokens", "noodle_prompt_tokens_total") == n_prompt  # fmt: skip
    assert value(after, "noodle_generated_tokens", "noodle_generated_tokens_total") - \
        value(before, "noodle_generated_tokens", "noodle_generated_tokens_total") == gen  # fmt: skip
    assert 0.0 <= value(after, "vllm:kv_cache_usage_perc", "vllm:kv_cache_usage_perc") <= 1.0
    assert value(after, "vllm:num_requests_running", "vllm:num_requests_running") >= 0

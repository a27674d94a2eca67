"""Seeded placement instances: real architectures on heterogeneous clusters.

Units come from :func:`noodle.models.analytic.analytic_units` on published configs
(GPT-2 small/XL, Llama-2 7B/13B/70B, and a GPT-3-175B-shaped GPT-2 with 96 blocks)
in float16. Nodes are drawn from a catalogue of real devices (GPUs, integrated GPUs,
CPU servers and desktops); ``compute_score`` follows memory bandwidth (decode is
memory-bound; the reference device streams 50 GB/s). Nodes sit in *sites* (a rack,
a home, an office): links inside a site are fast and differ per site, links between
sites are the slow default. The memory each node lends to the model is scaled so
that the cluster offers ``memory_ratio`` times what the model needs (weights + KV
cache), so memory binds; with ``jitter > 0`` every node's score and memory are
perturbed (no two nodes alike, no symmetry to exploit).
"""

from __future__ import annotations

import functools
import itertools
import random
from dataclasses import dataclass

from noodle.types import GIB, Cluster, Link, Node, Problem, Unit, Workload

__all__ = [
    "ARCHITECTURES", "DEVICES", "DeviceType", "random_instance", "model_units", "bench_grid", "GridPoint",
    "problem_to_spec",
]

# name -> (config source, overrides); config sources are files under specs/models or dicts.
ARCHITECTURES: dict[str, dict] = {
    "gpt2-small": {"model_type": "gpt2", "n_layer": 12, "n_embd": 768, "n_head": 12, "vocab_size": 50257},
    "gpt2-xl": {"model_type": "gpt2", "n_layer": 48, "n_embd": 1600, "n_head": 25, "vocab_size": 50257},
    "llama-2-7b": {
        "model_type": "llama", "num_hidden_layers": 32, "hidden_size": 4096, "intermediate_size": 11008,
        "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32000,
    },
    "llama-2-13b": {
        "model_type": "llama", "num_hidden_layers": 40, "hidden_size": 5120, "intermediate_size": 13824,
        "num_attention_heads": 40, "num_key_value_heads": 40, "vocab_size": 32000,
    },
    "llama-2-70b": {
        "model_type": "llama", "num_hidden_layers": 80, "hidden_size": 8192, "intermediate_size": 28672,
        "num_attention_heads": 64, "num_key_value_heads": 8, "vocab_size": 32000,
    },
    # GPT-3 175B is the GPT-2 architecture at 96 blocks of width 12288: 98 placement units.
    "gpt3-175b": {"model_type": "gpt2", "n_layer": 96, "n_embd": 12288, "n_head": 96, "vocab_size": 50257},
}


@dataclass(frozen=True)
class DeviceType:
    """A catalogue entry: memory the device can lend and its speed vs the reference."""

    name: str
    device: str  # gpu | igpu | cpu
    memory_gb: float
    compute_score: float


# Scores = memory bandwidth / 50 GB/s (decode streams the weights once per token).
DEVICES: tuple[DeviceType, ...] = (
    DeviceType("a100-80g", "gpu", 78, 40.0),
    DeviceType("a6000", "gpu", 46, 15.4),
    DeviceType("rtx4090", "gpu", 22, 20.0),
    DeviceType("rtx3090", "gpu", 22, 18.7),
    DeviceType("rtx3060", "gpu", 11, 7.2),
    DeviceType("m2-ultra", "igpu", 140, 16.0),
    DeviceType("m1-pro", "igpu", 12, 4.0),
    DeviceType("laptop-igpu", "igpu", 8, 1.5),
    DeviceType("epyc-server", "cpu", 240, 4.0),
    DeviceType("desktop-cpu", "cpu", 28, 1.2),
)


@functools.lru_cache(maxsize=32)
def model_units(arch: str, prompt_tokens: int = 512, max_new_tokens: int = 256, batch_size: int = 1) -> tuple[Unit, ...]:
    """Analytic float16 units of a catalogue architecture (cached)."""
    from noodle.models.analytic import analytic_units
    from noodle.models.loading import load_config

    if arch not in ARCHITECTURES:
        raise KeyError(f"unknown architecture {arch!r}; known: {', '.join(ARCHITECTURES)}")
    config = load_config(dict(ARCHITECTURES[arch]))
    return analytic_units(config, Workload(prompt_tokens, max_new_tokens, batch_size), dtype="float16").units


def random_instance(
    seed: int,
    *,
    arch: str = "llama-2-13b",
    n_nodes: int = 8,
    objective: str = "throughput",
    memory_ratio: float | None = None,
    jitter: float = 0.15,
    workload: Workload = Workload(512, 256, 1),
    units: tuple[Unit, ...] | None = None,
) -> Problem:
    """A seeded heterogeneous instance.

    Args:
        seed: everything random derives from it.
        arch: a key of :data:`ARCHITECTURES` (ignored when ``units`` is given).
        n_nodes: cluster size.
        objective: throughput or latency.
        memory_ratio: cluster memory / model memory; drawn from [1.2, 2.5] when None.
        jitter: relative perturbation of each node's score and memory (0: exact catalogue types).
        workload: the decode workload (sets the KV cache).
        units: use these units instead of an analytic architecture.
    """
    rng = random.Random(seed)
    label = arch if units is None else "units"
    units = units if units is not None else model_units(arch, workload.prompt_tokens, workload.max_new_tokens,
                                                          workload.batch_size)
    per_token = workload.context_tokens * workload.batch_size
    need = sum(u.param_bytes + u.kv_bytes_per_token * per_token for u in units) / GIB
    biggest_unit = max(u.param_bytes + u.kv_bytes_per_token * per_token for u in units) / GIB
    kinds = rng.sample(DEVICES, k=min(len(DEVICES), rng.randint(3, 6)))
    types = [rng.choice(kinds) for _ in range(n_nodes)]
    ratio = memory_ratio if memory_ratio is not None else rng.uniform(1.2, 2.5)
    raw = [t.memory_gb * (1 + rng.uniform(-jitter, jitter)) for t in types]
    scale = ratio * need / sum(raw)
    nodes = []
    for j, t in enumerate(types):
        score = t.compute_score * (1 + rng.uniform(-jitter, jitter))
        mem = max(raw[j] * scale, 1.05 * biggest_unit)
        nodes.append(Node(f"{t.name}-{j}", t.device, round(mem, 3), round(score, 3)))
    # Sites: groups of nodes with their own fast link; the default link joins sites.
    n_sites = max(1, min(n_nodes, rng.randint(1, max(1, n_nodes // 3))))
    site = [rng.randrange(n_sites) for _ in range(n_nodes)]
    site_link = [Link(rng.choice([10.0, 25.0, 40.0, 100.0]), rng.choice([0.02, 0.05, 0.1, 0.2])) for _ in range(n_sites)]
    default = Link(rng.choice([0.5, 1.0, 2.5]), rng.choice([1.0, 2.0, 5.0]))
    pairs = []
    for a, b in itertools.combinations(range(n_nodes), 2):
        if site[a] == site[b]:
            pairs.append((nodes[a].id, nodes[b].id, site_link[site[a]]))
    cluster = Cluster(tuple(nodes), default, tuple(pairs))
    name = f"{label}-{n_nodes}n-s{seed}-{objective}"
    return Problem(tuple(units), cluster, workload, objective, name=name)


@dataclass(frozen=True)
class GridPoint:
    """One benchmark instance description."""

    arch: str
    n_nodes: int
    objective: str
    seed: int
    jitter: float


def bench_grid(size: str = "default", seeds: int = 3) -> list[GridPoint]:
    """Instances for ``noodle bench solvers``: ``small`` (seconds), ``default`` (minutes), ``large``."""
    shapes = {
        "small": [("gpt2-small", 3), ("llama-2-7b", 4), ("llama-2-13b", 8)],
        "default": [("gpt2-small", 3), ("llama-2-7b", 4), ("llama-2-13b", 8), ("gpt2-xl", 8),
                    ("llama-2-70b", 16), ("gpt3-175b", 32)],
        "large": [("gpt2-small", 3), ("llama-2-7b", 4), ("llama-2-13b", 8), ("gpt2-xl", 8),
                  ("llama-2-70b", 16), ("gpt3-175b", 32), ("gpt3-175b", 64)],
    }[size]
    return [
        GridPoint(arch, m, obj, seed, 0.15)
        for arch, m in shapes
        for obj in ("throughput", "latency")
        for seed in range(seeds)
    ]


def problem_to_spec(problem: Problem, *, solver: str = "auto", time_limit_s: float = 10.0) -> dict:
    """A spec document (``noodle solve`` input) describing ``problem`` with inline layers."""
    c = problem.cluster
    return {
        "name": problem.name,
        "model": {"layers": [
            {"name": u.name, "latency_ms": u.latency_ms, "param_bytes": u.param_bytes,
             "activation_bytes": u.activation_bytes, "kv_bytes_per_token": u.kv_bytes_per_token}
            for u in problem.units
        ]},
        "workload": {"prompt_tokens": problem.workload.prompt_tokens,
                     "max_new_tokens": problem.workload.max_new_tokens, "batch_size": problem.workload.batch_size},
        "cluster": {
            "nodes": [{"id": nd.id, "device": nd.device, "memory_gb": nd.memory_gb, "compute_score": nd.compute_score}
                      for nd in c.nodes],
            "links": {
                "default": {"bandwidth_gbps": c.default_link.bandwidth_gbps, "latency_ms": c.default_link.latency_ms},
                "pairs": [{"a": a, "b": b, "bandwidth_gbps": ln.bandwidth_gbps, "latency_ms": ln.latency_ms}
                          for a, b, ln in c.pair_links],
            },
        },
        "objective": problem.objective,
        "solver": {"name": solver, "time_limit_s": time_limit_s},
    }

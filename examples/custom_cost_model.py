"""Replace noodle's cost model with your own and see the plan change.

Run: python examples/custom_cost_model.py

A cost model is any object with ``name`` and four methods (see noodle.CostModel):
``stage_compute_ms``, ``stage_memory_bytes``, ``hop_ms`` and ``return_ms``. Every
solver precomputes all (node, range) costs from it, so the model needs no special
structure: exact solvers stay exact under it.
"""

from __future__ import annotations

from pathlib import Path

from noodle import DefaultCostModel, Node, Problem, evaluate, load_spec, solve


class MeasuredOverheads(DefaultCostModel):
    """The default model plus what we measured on our own machines.

    * every stage pays a fixed 1.5 ms per token for its runtime (kernel launches, Python);
    * integrated GPUs share memory with the OS: only 70% of ``memory_gb`` is usable.
    """

    name = "measured-overheads"
    stage_overhead_ms = 1.5
    igpu_usable = 0.7

    def stage_compute_ms(self, problem: Problem, node: Node, start: int, end: int) -> float:
        return super().stage_compute_ms(problem, node, start, end) + self.stage_overhead_ms

    def stage_memory_bytes(self, problem: Problem, node: Node, start: int, end: int) -> int:
        need = super().stage_memory_bytes(problem, node, start, end)
        return int(need / self.igpu_usable) if node.device == "igpu" else need


def main() -> None:
    spec_path = Path(__file__).resolve().parents[1] / "specs" / "gpt2-home-lab.yaml"
    _spec, problem = load_spec(spec_path)
    for model in (DefaultCostModel(), MeasuredOverheads()):
        result = solve(problem, solver="auto", time_limit_s=10, cost_model=model)
        ev = evaluate(problem, result.plan, model)
        stages = ", ".join(
            f"{s.node}[{problem.units[s.start].name}..{problem.units[s.end - 1].name}]" for s in result.plan.stages
        )
        print(f"{model.name:>20}: {result.status}, bottleneck {ev.bottleneck_ms:.3f} ms -> {stages}")


if __name__ == "__main__":
    main()

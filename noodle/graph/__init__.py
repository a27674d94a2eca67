"""Cost graph and cost models (pure functions, no execution)."""

from noodle.graph.build import build_cost_graph
from noodle.graph.costmodel import CostModel, DefaultCostModel, Evaluation, StageCost, evaluate

__all__ = ["CostModel", "DefaultCostModel", "Evaluation", "StageCost", "evaluate", "build_cost_graph"]

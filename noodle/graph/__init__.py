"""Cost graph and cost models (pure functions, no execution)."""

from noodle.graph.build import build_cost_graph
from noodle.graph.costmodel import CostModel, DefaultCostModel, Evaluation, StageCost, cost_model_for, evaluate
from noodle.profile.pernode import PerNodeCostModel

__all__ = ["CostModel", "DefaultCostModel", "PerNodeCostModel", "Evaluation", "StageCost", "cost_model_for",
           "evaluate", "build_cost_graph"]

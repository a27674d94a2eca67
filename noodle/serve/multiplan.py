"""The plans of a server of several models (``noodle serve --model a=DIR --model b=DIR``).

Three sources, as for one model:

* ``--plan FILE``: a joint plan (``kind: joint``, from ``noodle solve`` on a spec with ``models:``); its
  model names are the served ids, each model runs its own pipeline (:func:`noodle.jointdoc.model_plans`).
* ``--spec FILE``: a spec with ``models:`` solved jointly at start-up (:func:`noodle.solvers.joint.solve_joint`).
* neither: each model planned on this machine alone (:func:`noodle.serve.planning.plan_this_machine`), and
  refused when their stages do not fit its free memory together. Each plan's predicted tokens/s assumes the
  machine's whole compute; the models share it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from noodle.errors import SpecError
from noodle.executors.base import check_plan
from noodle.executors.slicing import unit_names_of
from noodle.joint import JointProblem
from noodle.jointdoc import joint_document, load_joint_plan, model_plans
from noodle.plandoc import PlanDoc
from noodle.serve.planning import plan_this_machine
from noodle.solvers.joint import solve_joint
from noodle.spec import load_joint_spec

__all__ = ["plan_models"]


def plan_models(models: Sequence[tuple[str, Path]], *, plan: Path | None, spec: Path | None, concurrency: int,
                batching: str = "auto") -> tuple[dict[str, PlanDoc], str]:  # fmt: skip
    """Each model's plan by served id (``models``: ``(id, folder)``), and where the plans came from.

    Raises:
        SpecError: a plan or spec of other models (naming both sides), models that do not fit together.
    """
    if plan is not None and spec is not None:
        raise SpecError("serve: give --plan or --spec, not both")
    if plan is not None:
        plans, source = model_plans(load_joint_plan(plan), str(plan)), f"joint plan {plan}"
        flag = "--plan"
    elif spec is not None:
        plans, source = _solve_spec(spec), f"spec {spec}, solved jointly"
        flag = "--spec"
    else:
        return _this_machine(models, concurrency=concurrency, batching=batching)
    given, placed = [name for name, _ in models], list(plans)
    if sorted(given) != sorted(placed):
        raise SpecError(f"{flag}: it places models {', '.join(placed)}; --model names {', '.join(given)}; name each "
                        "--model as the plan does (NAME=FOLDER)")  # fmt: skip
    for name, folder in models:
        check_plan(plans[name], unit_names_of(folder), where=f"{flag} {name}")
    return {name: plans[name] for name in given}, source


def _solve_spec(path: Path) -> dict[str, PlanDoc]:
    spec, problem = load_joint_spec(path)
    if not isinstance(problem, JointProblem):
        raise SpecError(f"--spec: {path} places one model (model:); several --model take a spec with models:")
    result = solve_joint(problem, solver=spec.solver.name, time_limit_s=spec.solver.time_limit_s)
    return model_plans(joint_document(problem, result), str(path))


def _this_machine(models: Sequence[tuple[str, Path]], *, concurrency: int,
                  batching: str) -> tuple[dict[str, PlanDoc], str]:  # fmt: skip
    plans: dict[str, PlanDoc] = {}
    free_gb = 0.0
    for name, folder in models:
        doc, measured = plan_this_machine(folder, concurrency=concurrency, batching=batching)
        plans[name] = doc
        free_gb = float(measured["memory_gb"])
    need = {name: sum(st.memory_required_mb for st in doc.stages) / 1024 for name, doc in plans.items()}
    if sum(need.values()) > free_gb:
        each = ", ".join(f"{name} {gb:.2f} GiB" for name, gb in need.items())
        raise SpecError(f"--model: the models need {sum(need.values()):.2f} GiB together ({each}); this machine has "
                        f"{free_gb:.2f} GiB free; serve fewer models, or plan them over more nodes (--spec)")  # fmt: skip
    rates = ", ".join(f"{n} {d.predicted.pipeline_tokens_per_s or d.predicted.tokens_per_s:.1f}" for n, d in plans.items())
    return plans, (f"this machine, each model planned alone ({rates} tokens/s predicted with the machine to itself; "
                   "the models share its compute)")  # fmt: skip

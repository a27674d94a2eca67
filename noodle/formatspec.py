"""The spec's ``formats`` and ``accuracy`` -> :class:`~noodle.types.Formats` for the planner.

* ``formats`` (top level, or per node) lists the weight formats a stage may take; a node's own
  list wins. A format the node's device cannot run (:func:`noodle.models.quant.format_problem`)
  is refused when the node lists it, and dropped for that node when it comes from the top level.
* ``accuracy`` names a JSON of measured figures per format (``bench/results/quant.json``:
  ``{"formats": {"int8": {"token_agreement": 0.97, "perplexity_increase": 0.01}}}``) and the budget;
  a format that misses the budget is not offered at all (float32 is the reference and always is).
  The budget is checked per format on the whole model in that format, so any mix of allowed
  formats quantizes no more than a measured whole-model run did.
* Unit costs per format come from the profile's ``formats`` section (``noodle profile --formats``)
  or from ``model.layers[].formats``; a node with its own profile folder reads that folder's
  ``formats`` section too.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from noodle.errors import SpecError
from noodle.formats import FORMATS, FormatName, format_problem
from noodle.types import FormatOption, Formats, NodeProfile, Problem, Unit

if TYPE_CHECKING:
    from noodle.spec import Spec

__all__ = ["resolve_formats", "read_accuracy"]


def read_accuracy(path: Path, where: str) -> dict[str, dict[str, Any]]:
    """``{format: {token_agreement, perplexity_increase, ...}}`` of a measured-accuracy JSON."""
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SpecError(f"{where}: cannot read {path} ({exc}); run bench/quant.py to measure it") from None
    figs = doc.get("formats") if isinstance(doc, dict) else None
    if not isinstance(figs, dict):
        raise SpecError(f"{where}: {path}: expected {{\"formats\": {{format: {{token_agreement, ...}}}}}}")
    return {str(k): v for k, v in figs.items() if isinstance(v, dict)}


def _budget(spec: Spec, base: Path, source: str, wanted: Sequence[str]) -> tuple[set[str], dict[str, str]]:
    """Formats that meet the accuracy budget, and a note per format on what was measured."""
    acc = spec.accuracy
    notes: dict[str, str] = {}
    if acc is None:
        return set(wanted), notes
    where = f"{source}: accuracy.measured"
    figs = read_accuracy(base / acc.measured, where)
    ok = set()
    for fmt in wanted:
        if fmt == "float32":
            ok.add(fmt)
            continue
        f = figs.get(fmt)
        if f is None:
            raise SpecError(f"{where}: no figures for format {fmt} in {acc.measured} (it has "
                            f"{', '.join(figs) or 'none'}); measure it with bench/quant.py or drop {fmt} from formats")
        agree, ppl = f.get("token_agreement"), f.get("perplexity_increase")
        words = []
        passed = True
        if acc.min_token_agreement is not None:
            if not isinstance(agree, (int, float)):
                raise SpecError(f"{where}: formats.{fmt}.token_agreement: missing in {acc.measured}")
            passed &= agree >= acc.min_token_agreement
            words.append(f"token agreement {agree:.3f} {'>=' if agree >= acc.min_token_agreement else '<'} "
                         f"{acc.min_token_agreement:g}")
        if acc.max_perplexity_increase is not None:
            if not isinstance(ppl, (int, float)):
                raise SpecError(f"{where}: formats.{fmt}.perplexity_increase: missing in {acc.measured}")
            passed &= ppl <= acc.max_perplexity_increase
            words.append(f"perplexity {ppl:+.1%} {'<=' if ppl <= acc.max_perplexity_increase else '>'} "
                         f"+{acc.max_perplexity_increase:.1%}")
        notes[fmt] = ", ".join(words) + ("" if passed else ": over the accuracy budget")
        if passed:
            ok.add(fmt)
    return ok, notes


def _format_units(spec: Spec, problem: Problem, base: Path, source: str, fmt: FormatName) -> tuple[Unit, ...]:
    if fmt == "float32":
        return problem.units
    m = spec.model
    if m is None:  # to_problem refuses a joint spec (models:) before it resolves formats
        raise SpecError(f"{source}: formats: weight formats are chosen for one model (model:), not for models:")
    if m.layers is not None:
        missing = [layer.name for layer in m.layers if fmt not in layer.formats]
        if missing:
            raise SpecError(f"{source}: model.layers: unit {missing[0]!r} has no formats.{fmt} costs "
                            f"({len(missing)} units lack them); give latency_ms and param_bytes per format")
        return tuple(Unit(u.name, layer.formats[fmt].latency_ms, layer.formats[fmt].param_bytes, u.activation_bytes,
                          u.kv_bytes_per_token) for u, layer in zip(problem.units, m.layers))
    if m.profile is not None:
        from noodle.profile.units import load_units
        from noodle.profile.units import format_units

        _, meta = load_units(base / m.profile)
        per = format_units(meta.get("formats"), problem.units, meta["source"])
        if fmt not in per:
            raise SpecError(f"{source}: model.profile: {m.profile} has no {fmt} figures (it has "
                            f"{', '.join(['float32', *per])}); profile with noodle profile --formats float32,{fmt}")
        return per[fmt]
    raise SpecError(f"{source}: formats: weight formats need measured costs per format: model.profile from "
                    f"noodle profile --formats, or model.layers[].formats; model.hf_config has none")


def _node_profile(spec: Spec, problem: Problem, base: Path, i: int, fmt: str,
                  units: tuple[Unit, ...]) -> NodeProfile | None:
    """Node i's own profile in ``fmt``: its profile folder's figures for that format, when it has them."""
    n = spec.cluster.nodes[i]
    node = problem.cluster.node(n.id)
    if fmt == "float32":
        return node.profile
    if not isinstance(n.profile, str) or node.profile is None:
        return None
    from noodle.profile.units import load_units
    from noodle.profile.units import format_units

    _, meta = load_units(base / n.profile)
    mine = format_units(meta.get("formats"), problem.units, meta["source"]).get(fmt)
    if mine is None:
        return None
    return NodeProfile(unit_names=node.profile.unit_names, latency_ms=tuple(u.latency_ms for u in mine),
                       batch_size=node.profile.batch_size, param_bytes=tuple(u.param_bytes for u in mine),
                       kv_bytes_per_token=node.profile.kv_bytes_per_token,
                       source=f"{node.profile.source} ({fmt})")


def resolve_formats(spec: Spec, problem: Problem, base: Path, source: str) -> Formats:
    """The formats each node may run, their unit costs, and the accuracy notes (see the module docstring).

    Raises:
        SpecError: a node lists a format its device cannot run, a format lacks costs or accuracy figures,
            or a node is left with no format.
    """
    top = spec.formats or ["float32"]
    allowed: dict[str, list[str]] = {}
    for i, n in enumerate(spec.cluster.nodes):
        if n.formats is not None:
            for j, asked in enumerate(n.formats):
                wrong = format_problem(asked, n.device)
                if wrong:
                    raise SpecError(f"{source}: cluster.nodes[{i}].formats[{j}]: {wrong}")
            allowed[n.id] = list(dict.fromkeys(n.formats))
        else:
            allowed[n.id] = [f for f in top if format_problem(f, n.device) is None]
    wanted = [f for f in FORMATS if any(f in a for a in allowed.values())]
    ok, notes = _budget(spec, base, source, wanted)
    for i, n in enumerate(spec.cluster.nodes):
        kept = [f for f in allowed[n.id] if f in ok]
        if not kept and n.id not in problem.constraints.exclude:
            why = "; ".join(f"{f}: {notes.get(f) or 'cannot run on ' + repr(n.device)}" for f in allowed[n.id] or top)
            raise SpecError(f"{source}: cluster.nodes[{i}]: node {n.id!r} is left with no weight format ({why}); "
                            f"allow float32 or relax the accuracy budget")
        allowed[n.id] = kept
    options = []
    for fmt in [f for f in wanted if f in ok]:
        units = _format_units(spec, problem, base, source, fmt)
        profiles = tuple((n.id, p) for i, n in enumerate(spec.cluster.nodes)
                         if (p := _node_profile(spec, problem, base, i, fmt, units)) is not None)
        options.append(FormatOption(fmt, units, profiles, notes.get(fmt, "")))
    excluded = tuple((f, notes[f]) for f in wanted if f not in ok)
    return Formats(tuple(options), tuple((nid, tuple(a)) for nid, a in allowed.items()), excluded)

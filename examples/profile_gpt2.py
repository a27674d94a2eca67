"""Profile GPT-2 small end to end through the library API, then hand the profile to the planner.

    python examples/profile_gpt2.py                      # GPT-2 small, 10 warm-up + 100 iterations
    python examples/profile_gpt2.py --preset gpt2-tiny --iterations 5 --warmup 1   # a quick look

Steps: build the model from its preset with seeded random weights and save it as a
local folder (no model hub), load it back with from_pretrained, instrument it, warm
up, profile, write the dashboard, and read the placement units back with load_units.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from noodle.models import init_model, load_model
from noodle.profile import ObservabilityEngine, ProfileConfig, load_units


def main() -> None:
    parser = argparse.ArgumentParser(description="Profile a GPT-2 model unit by unit.")
    parser.add_argument("--preset", default="gpt2")
    parser.add_argument("--models", type=Path, default=Path("models"), help="where the model folder goes")
    parser.add_argument("--out", type=Path, default=None, help="profile folder (default runs/profile/<preset>)")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--iterations", type=int, default=100)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--decode-tokens", type=int, default=16)
    args = parser.parse_args()

    folder = args.models / args.preset
    if not (folder / "config.json").exists():
        init_model(args.preset, folder, seed=0)  # seeded random weights, saved with save_pretrained
    model = load_model(folder)  # the real from_pretrained(path) code path

    log_dir = args.out or Path("runs") / "profile" / args.preset
    config = ProfileConfig(
        model_name=args.preset,
        prompt_tokens=args.prompt_tokens,
        decode_tokens=args.decode_tokens,
        progress=True,
        source=str(folder),
    )
    engine = ObservabilityEngine(model, log_dir, config)
    engine.instrument()
    inputs = engine.make_inputs()
    engine.warmup(inputs, args.warmup)
    report = engine.profile(inputs, args.iterations)
    engine.save_dashboard(f"{args.preset}_profile")
    engine.remove()

    summary = report.summary
    print(f"profiled {args.preset} on {summary['reference_device']['description']}")
    for rank, b in enumerate(summary["bottlenecks"], start=1):
        print(f"  bottleneck {rank}: {b['name']:8s} {b['latency_ms']:8.3f} ms per decode step ({b['share']:.1%})")
    cov = summary["coverage"]
    print(f"  coverage: units {cov['units']['percent']}%, leaf modules {cov['leaf_modules']['percent']}%")

    units, meta = load_units(log_dir / "metrics.jsonl")  # what noodle solve reads for `model: {profile: ...}`
    total_ms = sum(u.latency_ms for u in units)
    print(f"  {len(units)} units, {total_ms:.2f} ms per token on the reference device "
          f"(compute_score {meta['reference_device']['compute_score']})")
    print(f"  dashboard: {log_dir / 'dashboard.html'}")


if __name__ == "__main__":
    main()

"""Memory of one stage vs the whole model: a stage loads only its own units' weights.

Each measurement runs in a fresh subprocess: import torch/transformers/noodle,
warm the meta-skeleton path once, read the RSS, load the stage (or the whole model
through ``from_pretrained``), read every weight once (tensors read through
safetensors may stay memory-mapped until touched), read the RSS again. Prints a table
and writes bench/results/stage_memory.{json,csv,png}.

    python bench/stage_memory.py [--preset gpt2]
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import tempfile
from pathlib import Path

_CHILD = r"""
import gc, json, sys, warnings
warnings.simplefilter("ignore")
import psutil, torch
from noodle.executors.slicing import unit_names_of
from noodle.executors.stage import StageRunner
from noodle.models import load_model
folder, start, end = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
unit_names_of(folder)  # warm the meta-skeleton path (imports, class registries)
gc.collect()
proc = psutil.Process()
before = proc.memory_info().rss
if start < 0:
    obj = load_model(folder)
    held = sum(t.numel() * t.element_size() for t in {id(p): p for p in [*obj.parameters(), *obj.buffers()]}.values())
else:
    obj = StageRunner(folder, start, end)
    held = obj.param_bytes()
gc.collect()
untouched = proc.memory_info().rss
mods = [obj] if start < 0 else list(obj.slice.modules())
with torch.no_grad():  # fault every weight page in (safetensors tensors may be mmap-backed)
    for m in mods:
        for t in [*m.parameters(), *m.buffers()]:
            t.float().sum()
gc.collect()
after = proc.memory_info().rss
print(json.dumps({"rss_delta_bytes": after - before, "rss_untouched_bytes": untouched - before, "param_bytes": held}))
"""


def measure(folder: Path, start: int, end: int) -> dict[str, int]:
    out = subprocess.run([sys.executable, "-c", _CHILD, str(folder), str(start), str(end)],
                         check=True, capture_output=True, text=True)  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="gpt2")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()

    from noodle.executors.slicing import unit_names_of
    from noodle.models import init_model

    with tempfile.TemporaryDirectory(prefix="noodle-mem-") as tmp:
        folder = init_model(args.preset, Path(tmp) / args.preset)
        units = unit_names_of(folder)
        n, blocks = len(units), len(units) - 2
        t1, t2 = 1 + blocks // 3, 1 + 2 * blocks // 3
        cases = [
            ("from_pretrained (whole model)", -1, -1),
            (f"stage [0,{n}) whole model", 0, n),
            (f"stage [0,{t1}) embed + first third of blocks", 0, t1),
            (f"stage [{t1},{t2}) middle third of blocks", t1, t2),
            (f"stage [{t2},{n}) last third of blocks + head", t2, n),
        ]
        rows = []
        for label, a, b in cases:
            m = measure(folder, a, b)
            rows.append({"case": label, "start": a, "end": b, **m})
            print(f"{label:48s} params {m['param_bytes'] / 2**20:8.1f} MiB   RSS +{m['rss_delta_bytes'] / 2**20:8.1f} MiB",
                  flush=True)  # fmt: skip
    whole = rows[1]["param_bytes"]
    whole_rss = rows[1]["rss_delta_bytes"]
    for r in rows:
        r["param_fraction"] = r["param_bytes"] / whole
        r["rss_fraction"] = r["rss_delta_bytes"] / whole_rss
    result = {"benchmark": "stage_memory", "model": args.preset, "units": n, "blocks": blocks, "cases": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "stage_memory.json").write_text(json.dumps(result, indent=2) + "\n")
    with (args.out / "stage_memory.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3.6))
    labels = [r["case"].replace(" (whole model)", "").replace("stage ", "") for r in rows]
    ys = range(len(rows))
    ax.barh([y + 0.2 for y in ys], [r["param_bytes"] / 2**20 for r in rows], 0.4, label="weights held")
    ax.barh([y - 0.2 for y in ys], [r["rss_delta_bytes"] / 2**20 for r in rows], 0.4, label="RSS growth")
    ax.set_yticks(list(ys), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("MiB")
    ax.set_title(f"{args.preset}: memory of one stage vs the whole model")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out / "stage_memory.png", dpi=120)
    print(f"wrote {args.out / 'stage_memory.json'}, .csv, .png")


if __name__ == "__main__":
    main()

"""Re-quantize a GGUF file's quantized tensors to another llama.cpp type (e.g. the Q4_1 SmolLM2 to Q8_0).

The only GGUF this project can reach is SmolLM2-135M-Instruct in Q4_1; comparing noodle's int8 with
llama.cpp at the same bits needs a Q8_0 file. This writes one: every quantized tensor is
dequantized and quantized again to ``--type`` with gguf-py's reference quantizer; float tensors and
all metadata (tokenizer, chat template, hyper-parameters) are copied unchanged. The weights carry the
Q4_1 rounding, exactly like ``out/models/smollm2`` (imported from the same file), so both sides of
the comparison start from the same values.

    python bench/gguf_requant.py ~/.cache/noodle/SmolLM2-135M-Instruct.Q4_1.gguf --type Q8_0 \
        --out ~/.cache/noodle/SmolLM2-135M-Instruct.Q8_0.gguf
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np


def requantize(src: Path, out: Path, qtype_name: str) -> dict[str, int]:
    """Write ``out``; returns how many tensors were re-quantized and copied."""
    import gguf
    from gguf.quants import dequantize, quantize

    qtype = gguf.GGMLQuantizationType[qtype_name]
    reader = gguf.GGUFReader(str(src))
    arch = str(reader.fields["general.architecture"].contents())
    writer = gguf.GGUFWriter(str(out), arch)
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), vtype, sub_type=sub)
    counts = {"requantized": 0, "copied": 0}
    float_types = (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.BF16)
    for t in reader.tensors:
        if t.tensor_type in float_types or t.tensor_type == qtype:
            writer.add_tensor(t.name, np.asarray(t.data), raw_shape=t.data.shape, raw_dtype=t.tensor_type)
            counts["copied"] += 1
            continue
        values = dequantize(t.data, t.tensor_type).astype(np.float32)
        packed = quantize(values, qtype)
        writer.add_tensor(t.name, packed, raw_shape=packed.shape, raw_dtype=qtype)
        counts["requantized"] += 1
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return counts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("src", type=Path)
    ap.add_argument("--type", default="Q8_0", help="a llama.cpp quantization type gguf-py can write (Q8_0, Q4_0, ...)")
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()
    if not a.src.is_file():
        sys.exit(f"gguf_requant: {a.src} is not a file")
    counts = requantize(a.src, a.out, a.type)
    print(f"wrote {a.out}: {counts['requantized']} tensors re-quantized to {a.type}, {counts['copied']} copied "
          f"({a.out.stat().st_size / 1e6:.0f} MB)")


if __name__ == "__main__":
    main()

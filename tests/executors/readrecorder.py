"""Which tensors a stage reads from the safetensors files (every ``safe_open`` read is recorded)."""

from __future__ import annotations

import pytest
import safetensors


def record_reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    reads: list[str] = []
    real = safetensors.safe_open

    class Recording:
        def __init__(self, *a, **kw):
            self._f = real(*a, **kw)

        def __enter__(self):
            self._inner = self._f.__enter__()
            return self

        def __exit__(self, *exc):
            return self._f.__exit__(*exc)

        def keys(self):
            return self._inner.keys()

        def get_tensor(self, name):
            reads.append(name)
            return self._inner.get_tensor(name)

        def get_slice(self, name):  # transformers' conversion reads lazily, through slices
            reads.append(name)
            return self._inner.get_slice(name)

    monkeypatch.setattr(safetensors, "safe_open", Recording)
    return reads

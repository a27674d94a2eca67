"""Token ids -> text as they arrive: incremental detokenization, stop strings, single tokens' text.

Decoding each token alone breaks multi-byte characters and merges that depend on the
previous token, so :class:`Detokenizer` decodes a short window (the approach of TGI and
vLLM): the text of ``ids[prefix:]`` minus the text of ``ids[prefix:read]`` is what the new
tokens added, held back while it ends in an incomplete character (U+FFFD).

:class:`StopMatcher` finds stop strings across token boundaries: it releases text only
once no stop string can start in it, and cuts the text before a matched stop.
:class:`TokenPieces` spells single tokens the way log probabilities list them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = ["Detokenizer", "StopMatcher", "TokenPieces"]


class Detokenizer:
    """Feeds token ids, returns the text each one adds (possibly ``""``)."""

    def __init__(self, tokenizer: Any, prompt_ids: Sequence[int] = (), *, skip_special_tokens: bool = True) -> None:
        self._tok = tokenizer
        self._skip = skip_special_tokens
        # A few prompt tokens of context make the first new token decode as it would mid-text.
        self._ids: list[int] = list(prompt_ids[-4:])
        self._prefix = 0
        self._read = len(self._ids)

    def _decode(self, ids: Sequence[int]) -> str:
        return str(self._tok.decode(list(ids), skip_special_tokens=self._skip))

    def add(self, token_id: int) -> str:
        self._ids.append(int(token_id))
        before = self._decode(self._ids[self._prefix : self._read])
        after = self._decode(self._ids[self._prefix :])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            new = after[len(before) :] if after.startswith(before) else after
            self._prefix, self._read = self._read, len(self._ids)
            return new
        return ""

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character at the very end)."""
        before = self._decode(self._ids[self._prefix : self._read])
        after = self._decode(self._ids[self._prefix :])
        self._prefix = self._read = len(self._ids)
        return after[len(before) :] if after.startswith(before) else ""


class StopMatcher:
    """Holds back text that could begin a stop string; cuts at the first stop found."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = tuple(s for s in stops if s)
        self._buf = ""
        self.matched: str | None = None

    def feed(self, text: str) -> str:
        """Text that is safe to send now; after a match, the text before the stop and then nothing."""
        if self.matched is not None:
            return ""
        if not self.stops:
            return text
        self._buf += text
        hits = [(self._buf.find(s), s) for s in self.stops]
        hits = [(i, s) for i, s in hits if i >= 0]
        if hits:
            i, stop = min(hits)
            self.matched = stop
            out, self._buf = self._buf[:i], ""
            return out
        hold = self._held_back()
        out = self._buf[: len(self._buf) - hold]
        self._buf = self._buf[len(self._buf) - hold :]
        return out

    def _held_back(self) -> int:
        """Length of the longest end of the buffer that is the start of some stop string."""
        best = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(self._buf)), best, -1):
                if self._buf.endswith(s[:k]):
                    best = k
                    break
        return best

    def flush(self) -> str:
        """At the end of generation: the held-back text (it never became a stop)."""
        out, self._buf = ("" if self.matched is not None else self._buf), ""
        return out


def _byte_level_chars(tokenizer: Any) -> dict[str, int] | None:
    """Character -> byte of a byte-level BPE vocabulary (GPT-2, Llama 3, SmolLM2), else ``None``."""
    from tokenizers.decoders import ByteLevel  # transformers' own dependency

    if not isinstance(getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None), ByteLevel):
        return None
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return {ch: b for b, ch in bytes_to_unicode().items()}


class TokenPieces:
    """Each token id as log probabilities show it: ``(text, bytes)``, cached (at most the vocabulary).

    A byte-level vocabulary spells bytes as characters; they are mapped back, so a token holding
    part of a UTF-8 character gives its real bytes and a text such as ``"\\xe6"``, and the texts of
    a response's tokens add up to its text. Other tokenizers give each token decoded alone.
    """

    def __init__(self, tokenizer: Any) -> None:
        self._tok = tokenizer
        self._chars = _byte_level_chars(tokenizer)
        self._cache: dict[int, tuple[str, list[int]]] = {}

    def __call__(self, token_id: int) -> tuple[str, list[int]]:
        hit = self._cache.get(token_id)
        if hit is None:
            hit = self._cache[token_id] = self._piece(token_id)
        return hit

    def _piece(self, token_id: int) -> tuple[str, list[int]]:
        if self._chars is not None:
            spelled = self._tok.convert_ids_to_tokens(int(token_id))
            if isinstance(spelled, str) and spelled and all(ch in self._chars for ch in spelled):
                raw = bytes(self._chars[ch] for ch in spelled)
                return raw.decode("utf-8", errors="backslashreplace"), list(raw)
        text = str(self._tok.decode([int(token_id)], skip_special_tokens=False))
        return text, list(text.encode("utf-8", errors="surrogatepass"))

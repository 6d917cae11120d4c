"""Settings written on a command line as KEY=VALUE words: sweep.py's grid, bench.py --compare."""

from __future__ import annotations


def parse_key_values(text: str, flag: str) -> list[tuple[str, list[str]]]:
    """'a=1,2 b=x' -> [('a', ['1', '2']), ('b', ['x'])]; a word without '=value' stops with a usage error."""
    pairs = []
    for word in text.split():
        key, _, values = word.partition("=")
        if not key or not values:
            raise SystemExit(f"error: {flag} {word!r}: expected KEY=VALUE (several values: KEY=V1,V2)")
        pairs.append((key, values.split(",")))
    return pairs


def typed_like(default, text: str):
    """text as a value of default's type (YAML's bool, int, float or str)."""
    if isinstance(default, bool):
        return text.lower() in ("1", "true", "yes")
    return text if isinstance(default, str) else type(default)(text)

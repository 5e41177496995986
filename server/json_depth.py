"""How deep a JSON text nests, found before anything parses it.

A parser recurses once per level: 100 KB of `[` takes Python's json (and pydantic after it) to
its recursion limit, a RecursionError where the client should hear "bad JSON". The contract's
frames and bodies nest a handful of levels, so anything deeper than MAX_JSON_DEPTH is refused
as bad_json up front.

The scan runs at C speed, whatever the text (a Python loop over a 256 KB frame of brackets
would cost ~100 ms, a denial of service of its own): ordinary frames have fewer opening
brackets than the limit and cost two `count` calls; otherwise strings are cut out (escapes
first), the brackets left are kept alone (`bytes.translate`), and each pass of
`replace("()", "")` removes every innermost pair, so the nesting is deeper than `limit` exactly
when something is left after `limit` passes. Measured on this machine for 256 KB at a limit
of 64: ~2 ms for 250,000 `[` or `[]` pairs, 35 ms at worst (2,000 chains each exactly 64 deep,
so every pass runs), against ~100 ms for a Python loop over the characters.
"""

from __future__ import annotations

# Opening brackets -> "(", closing ones -> ")", every other byte deleted.
_TABLE = bytes.maketrans(b"[{]}", b"(())")
_OTHER = bytes(set(range(256)) - set(b"[{]}"))


def too_deep(text: str, limit: int) -> bool:
    """Whether `text`, read as JSON, nests arrays and objects more than `limit` levels deep
    (brackets inside strings do not count). Malformed JSON may count as too deep (unclosed
    brackets); it is bad JSON either way."""
    if text.count("[") + text.count("{") <= limit:
        return False
    # Escaped backslashes, then escaped quotes, then every string: what is left is structure.
    structure = text.replace("\\\\", "").replace('\\"', "").split('"')[::2]
    brackets = "".join(structure).encode("utf-8", "surrogatepass").translate(_TABLE, _OTHER)
    for _ in range(limit):
        shorter = brackets.replace(b"()", b"")
        if shorter == brackets:
            break
        brackets = shorter
    return b"(" in brackets

"""Method specs on the command line: ``name`` or ``name:key=value,key=value`` (one parser for every
command: ``bench --methods``, ``show --method``, ``eval --method``, and the repeatable ``KEY=VALUE``
items of ``eval --param``, ``eval --processor-arg`` and ``sweep --param``)."""

from __future__ import annotations

import json
from typing import Any

#: Python spellings accepted beside JSON's true/false/null.
_ALIASES: dict[str, Any] = {"True": True, "False": False, "None": None}


def parse_value(text: str) -> Any:
    """A parameter value: JSON where it parses (numbers, true/false/null, lists such as ``[8,16,24]``),
    Python's ``True``/``False``/``None``, else the string itself."""
    if text in _ALIASES:
        return _ALIASES[text]
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def split_top_level(text: str) -> list[str]:
    """``text`` split on the commas outside ``[]`` and ``{}`` (so list values keep their commas)."""
    items, depth, current = [], 0, ""
    for ch in text:
        depth += (ch in "[{") - (ch in "]}")
        if ch == "," and depth == 0:
            items.append(current)
            current = ""
        else:
            current += ch
    items.append(current)
    return [item.strip() for item in items if item.strip()]


def _item(item: str) -> tuple[str, Any] | None:
    """One ``key=value`` item -> ``(key, value)`` (value as :func:`parse_value`), None when malformed."""
    key, sep, value = item.partition("=")
    if not sep or not key.strip():
        return None
    return key.strip(), parse_value(value.strip())


def parse_params(items: list[str] | None, flag: str = "--param") -> dict[str, Any]:
    """Repeated ``KEY=VALUE`` options (``--param heads=16 --param layers=[1,2]``) -> ``{key: value}``;
    raises ``ValueError`` naming ``flag`` for an item without ``=`` or without a key, and for a key given
    twice with different values."""
    out: dict[str, Any] = {}
    for item in items or []:
        parsed = _item(item)
        if parsed is None:
            raise ValueError(f"{flag} expects key=value, got {item!r}")
        _put(out, parsed, flag)
    return out


def _put(out: dict[str, Any], parsed: tuple[str, Any], where: str) -> None:
    """``out[key] = value``, refusing a key already set to another value (``where`` names the input)."""
    key, value = parsed
    if key in out and out[key] != value:
        raise ValueError(f"{where}: {key} is given twice ({out[key]!r} and {value!r})")
    out[key] = value


def parse_method_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """``"finepruner:tokens=64,heads=16,strategy=sparsity"`` -> ``("finepruner", {...})``.

    Raises ``ValueError`` naming the spec for an empty name or an item without ``=``. The name is not
    looked up here (``finepruner.methods.get`` does that, listing the registered methods)."""
    name, _, rest = spec.partition(":")
    name = name.strip()
    if not name:
        raise ValueError(f"method spec {spec!r} has no method name")
    params: dict[str, Any] = {}
    for item in split_top_level(rest):
        parsed = _item(item)
        if parsed is None:
            raise ValueError(f"method spec {spec!r}: expected key=value, got {item!r}")
        _put(params, parsed, f"method spec {spec!r}")
    return name, params

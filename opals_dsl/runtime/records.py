"""The journal's line format: one JSON object per line, ``{"task":NAME,"sig":SIG,...}``, written
so that a task's name and sig can be read without parsing the rest (a journal of 100,000 tasks
is loaded as text and parsed only where a decision needs a record)."""

from __future__ import annotations

import json
from typing import Any

from ..plan.wire import Stat

#: one encoder, made once: json.dumps with options builds a new encoder every call
ENCODE = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode

SIG_MARK = ',"sig":"'


def record_line(name: str, sig: str, body: str) -> str:
    """``{"task":NAME,"sig":SIG,`` + the rest of ``body`` (a JSON object) + newline."""
    head = '{"task":' + ENCODE(name) + SIG_MARK + sig + '"'
    return head + ("," + body[1:] if body != "{}" else "}") + "\n"


def name_of(text: str) -> str | None:
    """The task name of a complete record line, or None for a line that is not one."""
    text = text.rstrip("\r\n")
    if not (text.startswith('{"task":') and text.endswith("}")):
        return None
    at = text.find(SIG_MARK)
    if at < 0 or len(text) < at + len(SIG_MARK) + 17:
        return None
    quoted = text[8:at]
    if "\\" in quoted:
        try:
            name = json.loads(quoted)
        except (ValueError, RecursionError):
            return None
    else:
        name = quoted[1:-1] if len(quoted) >= 2 and quoted[0] == quoted[-1] == '"' else None
    return name if isinstance(name, str) else None


def well_formed(rec: Any) -> bool:
    """Has a parsed record the fields, of the types, that :meth:`Journal._compare` reads?"""
    if not isinstance(rec, dict):
        return False
    if rec.get("failed"):
        return True
    steps = rec.get("steps")
    if not isinstance(rec.get("cmd"), str) or not isinstance(steps, list):
        return False
    if not all(isinstance(s, list) and s and isinstance(s[0], str) for s in steps):
        return False
    for key in ("in", "up", "out"):
        part = rec.get(key, {})
        if not isinstance(part, dict):
            return False
    return all(isinstance(v, list) for key in ("in", "out") for v in rec.get(key, {}).values())


def record_body(line: str) -> str:
    """The record as a JSON object without its task and sig (for ``json.loads``)."""
    at = line.find(SIG_MARK)
    rest = line[at + len(SIG_MARK) + 17:].rstrip("\r\n")
    return "{" + rest[1:] if rest.startswith(",") else "{" + rest


def receipt_stats(found: Any) -> dict[str, Stat]:
    """What a receipt says the engine saw of some files: ``{path: [size, mtime_ns, ...]}``
    (an entry of another shape is left out: that file is looked at anew)."""
    if not isinstance(found, dict):
        return {}
    return {k: tuple(v) for k, v in found.items() if isinstance(v, list) and len(v) >= 2}

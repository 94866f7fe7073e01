"""Plain data across the sandbox's boundary: the only thing that crosses it.

Values are None, bool, int, float, str, bytes and lists, tuples, dicts, sets and frozensets of them,
by exact type (a subclass of int could carry its own `__eq__`). The wire form is JSON with tagged
containers, so a tuple comes back a tuple and a dict may have int keys. Anything else is refused on
both sides: the sandbox cannot hand over an object, only data the trusted side rebuilds itself.

This file must stay standard-library only: the sandboxed server runs its source as is.
"""

import json

MAX_DEPTH = 50
# Members of one set or dict rebuilt on the trusted side: keys crafted to share one hash make building
# a set quadratic in C, where no alarm can stop it (41,500 such ints took 9 s); 2,000 take milliseconds.
MAX_HASHED = 2000


class NotPlainData(ValueError):
    pass


def encode(value, depth=0):
    if depth > MAX_DEPTH:
        raise NotPlainData("nested too deep")
    kind = type(value)
    if value is None or kind in (bool, int, str):
        return value
    if kind is float:
        finite = value == value and value not in (float("inf"), float("-inf"))
        return value if finite else {"t": "float", "v": repr(value)}
    if kind is list:
        return [encode(item, depth + 1) for item in value]
    if kind in (tuple, set, frozenset):
        items = sorted(value, key=repr) if kind is not tuple else value
        return {"t": kind.__name__, "v": [encode(item, depth + 1) for item in items]}
    if kind is dict:
        return {"t": "dict", "v": [[encode(k, depth + 1), encode(v, depth + 1)] for k, v in value.items()]}
    if kind is bytes:
        return {"t": "bytes", "v": value.hex()}
    raise NotPlainData(f"a {kind.__name__} is not plain data")


def decode(data, depth=0):
    if depth > MAX_DEPTH:
        raise NotPlainData("nested too deep")
    kind = type(data)
    if data is None or kind in (bool, int, str, float):
        return data
    if kind is list:
        return [decode(item, depth + 1) for item in data]
    if kind is not dict or set(data) != {"t", "v"}:
        raise NotPlainData(f"not a plain-data encoding: {str(data)[:60]}")
    tag, items = data["t"], data["v"]
    if tag == "float" and items in ("nan", "inf", "-inf"):
        return float(items)
    if tag == "bytes" and type(items) is str:
        return bytes.fromhex(items)
    if type(items) is not list:
        raise NotPlainData(f"malformed {tag!r}")
    if tag == "tuple":
        return tuple(decode(item, depth + 1) for item in items)
    if tag in ("set", "frozenset", "dict") and len(items) > MAX_HASHED:
        raise NotPlainData(f"a {tag} of {len(items)} members (at most {MAX_HASHED})")
    if tag in ("set", "frozenset"):
        members = [decode(item, depth + 1) for item in items]
        return set(members) if tag == "set" else frozenset(members)
    if tag == "dict":
        if not all(type(pair) is list and len(pair) == 2 for pair in items):
            raise NotPlainData("malformed dict")
        return {decode(k, depth + 1): decode(v, depth + 1) for k, v in items}
    raise NotPlainData(f"unknown tag {tag!r}")


def dumps(message):
    return json.dumps(message, separators=(",", ":"), allow_nan=False) + "\n"

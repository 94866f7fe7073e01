"""Plain data across the sandbox's boundary: the only thing that crosses it.

Values are None, bool, int, float, complex, str, bytes and lists, tuples, dicts, sets and frozensets of them,
by exact type (a subclass of int could carry its own `__eq__`). The wire form is JSON with tagged
containers, so a tuple comes back a tuple and a dict may have int keys. Anything else is refused on
both sides: the sandbox cannot hand over an object, only data the trusted side rebuilds itself.

This file must stay standard-library only: the sandboxed server runs its source as is.
"""

import collections
import json

MAX_DEPTH = 50
# Set members and dict keys rebuilt on the trusted side, per value: keys crafted to share one hash make
# building a set quadratic in C, where no alarm can stop it (41,500 such ints took 9 s; nested frozensets
# of 215 x 215 took 10 s); 2,000 flat ones take milliseconds.
MAX_HASHED = 2000
# Mappings of the standard library whose `==` is a dict's: a program's Counter crosses as the dict it
# equals (MBPP: `assert freq_count(...) == {10: 4, ...}`). OrderedDict is not one (its `==` sees order).
DICT_KINDS = (dict, collections.Counter, collections.defaultdict)
SCALARS = (type(None), bool, int, float, complex, str, bytes)


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
    if kind is complex:
        return {"t": "complex", "v": [encode(value.real, depth + 1), encode(value.imag, depth + 1)]}
    if kind is list:
        return [encode(item, depth + 1) for item in value]
    if kind in (tuple, set, frozenset):
        items = sorted(value, key=repr) if kind is not tuple else value
        return {"t": kind.__name__, "v": [encode(item, depth + 1) for item in items]}
    if kind in DICT_KINDS:
        return {"t": "dict", "v": [[encode(k, depth + 1), encode(v, depth + 1)] for k, v in value.items()]}
    if kind is bytes:
        return {"t": "bytes", "v": value.hex()}
    raise NotPlainData(f"a {kind.__name__} is not plain data")


def decode(data, depth=0, budget=None):
    """The value `data` encodes. Set members and dict keys must be scalars or flat tuples of scalars, at
    most MAX_HASHED of them (tuple items counted) in one value: hashing is where crafted data is slow."""
    budget = [MAX_HASHED] if budget is None else budget
    if depth > MAX_DEPTH:
        raise NotPlainData("nested too deep")
    kind = type(data)
    if data is None or kind in (bool, int, str, float):
        return data
    if kind is list:
        return [decode(item, depth + 1, budget) for item in data]
    if kind is not dict or set(data) != {"t", "v"}:
        raise NotPlainData(f"not a plain-data encoding: {str(data)[:60]}")
    tag, items = data["t"], data["v"]
    if tag == "float" and items in ("nan", "inf", "-inf"):
        return float(items)
    if tag == "bytes" and type(items) is str:
        try:
            return bytes.fromhex(items)
        except ValueError:
            raise NotPlainData("malformed bytes") from None
    if type(items) is not list:
        raise NotPlainData(f"malformed {tag!r}")
    if tag == "tuple":
        return tuple(decode(item, depth + 1, budget) for item in items)
    if tag == "complex":
        parts = [decode(item, depth + 1, budget) for item in items]
        if len(parts) != 2 or not all(type(part) is float for part in parts):
            raise NotPlainData("malformed complex")
        return complex(*parts)
    if tag in ("set", "frozenset"):
        members = [_hashable(item, depth + 1, budget) for item in items]
        return set(members) if tag == "set" else frozenset(members)
    if tag == "dict":
        if not all(type(pair) is list and len(pair) == 2 for pair in items):
            raise NotPlainData("malformed dict")
        return {_hashable(k, depth + 1, budget): decode(v, depth + 1, budget) for k, v in items}
    raise NotPlainData(f"unknown tag {tag!r}")


def _hashable(data, depth, budget):
    value = decode(data, depth, budget)
    flat = type(value) is not tuple or all(type(item) in SCALARS for item in value)
    if type(value) in (list, set, frozenset, dict) or not flat:
        raise NotPlainData("a set member or dict key that is not a scalar or a flat tuple")
    budget[0] -= 1 + (len(value) if type(value) is tuple else 0)
    if budget[0] < 0:
        raise NotPlainData(f"more than {MAX_HASHED} set members or dict keys")
    return value


def dumps(message):
    return json.dumps(message, separators=(",", ":"), allow_nan=False) + "\n"

"""Plain values across the sandbox's process boundaries: one Python literal per line.

Standard library only (it runs inside the sandbox too). Only exact built-in types are plain:
None, bool, int, float, complex, str, bytes, and list, tuple, set, frozenset and dict of plain
values, and (exactly these classes) collections' Counter, OrderedDict, defaultdict (without its
factory) and deque. A built-in function or class crosses by name (``B('int')``: the receiver's
own). Any other object (a subclass of int, an object with its own ``__eq__``) crosses as a
handle ``H(n)``, which the receiving side maps to something of its own (``decode``'s
``handle``). ``decode`` reads text with the compiler's parser and builds the values itself (never
``eval``): text written by a program cannot run code, or make a value with methods of its own,
on the side that reads it.
"""
from __future__ import annotations

import builtins
import sys
from collections.abc import Callable

PyCF_ONLY_AST = 0x400     # compile(): return the syntax tree (ast.PyCF_ONLY_AST, without ast)
MAX_DEPTH = 100           # nesting of containers
_SCALARS = (type(None), bool, int, str, bytes)
_SPECIAL_FLOATS = ("nan", "inf", "-inf")


def encode(value: object, handle: Callable[[object], int]) -> str:
    """``value`` as a one-line literal; ``handle(obj)`` numbers a non-plain object (or raises)."""
    parts: list[str] = []
    _encode(value, handle, parts, 0)
    return "".join(parts)


def _float(value: float) -> str:
    text = repr(value)
    return f"float({text!r})" if text in _SPECIAL_FLOATS else text


def _encode(value: object, handle: Callable[[object], int], out: list[str], depth: int) -> None:
    if depth > MAX_DEPTH:
        raise ValueError(f"values nested deeper than {MAX_DEPTH} cannot cross")
    kind = type(value)
    if kind in _SCALARS:
        try:
            out.append(repr(value))
        except ValueError:  # an int of more than 4300 digits: hex has no such limit
            out.append(hex(value))  # type: ignore[arg-type]
    elif kind is float:
        out.append(_float(value))  # type: ignore[arg-type]
    elif kind is complex:
        out.append(f"complex({_float(value.real)}, {_float(value.imag)})")  # type: ignore
    elif kind in (list, tuple, set, frozenset):
        items = list(value)  # type: ignore[call-overload]
        opening, closing = {list: ("[", "]"), tuple: ("(", ",)" if items else ")"),
                            set: ("{", "}") if items else ("set(", ")"),
                            frozenset: ("frozenset({", "})") if items else ("frozenset(", ")")
                            }[kind]
        out.append(opening)
        for index, item in enumerate(items):
            if index:
                out.append(", ")
            _encode(item, handle, out, depth + 1)
        out.append(closing)
    elif kind is dict:
        out.append("{")
        for index, (key, item) in enumerate(value.items()):  # type: ignore[attr-defined]
            if index:
                out.append(", ")
            _encode(key, handle, out, depth + 1)
            out.append(": ")
            _encode(item, handle, out, depth + 1)
        out.append("}")
    elif _collection(kind):
        _encode_collection(value, kind.__name__, handle, out, depth)
    elif (plain := _plain_value(value)) is not None:
        _encode(plain, handle, out, depth)
    elif _builtin_name(value):
        out.append(f"B({value.__name__!r})")  # type: ignore[attr-defined]
    else:
        out.append(f"H({int(handle(value))})")


_COLLECTIONS = ("Counter", "OrderedDict", "defaultdict", "deque")
# built-in functions that may cross by name: pure ones (never eval, exec, open, __import__, ...)
_PURE = frozenset(("abs", "all", "any", "ascii", "bin", "callable", "chr", "divmod", "format",
                   "hash", "hex", "id", "isinstance", "issubclass", "iter", "len", "max", "min",
                   "next", "oct", "ord", "pow", "repr", "round", "sorted", "sum"))


def _collection(kind: type) -> bool:
    """Exactly one of collections' classes (never a subclass, nor a look-alike)?"""
    module = sys.modules.get("collections")
    return module is not None and kind.__name__ in _COLLECTIONS \
        and getattr(module, kind.__name__, None) is kind


def _encode_collection(value, name: str, handle, out: list[str], depth: int) -> None:
    out.append(f"{name}(")
    if name == "deque":
        _encode(list(value), handle, out, depth + 1)
    elif name == "OrderedDict":
        _encode([(k, v) for k, v in dict.items(value)], handle, out, depth + 1)
    else:
        _encode(dict(dict.items(value)), handle, out, depth + 1)
    out.append(")")


def _crossing_builtin(name: object) -> object:
    """The built-in class, or pure built-in function, of that name (None for any other)."""
    found = getattr(builtins, name, None) if isinstance(name, str) else None
    return found if isinstance(found, type) or name in _PURE else None


# a subclass of these that keeps the base's __eq__ crosses as the base's value, read with the
# base's own methods (a namedtuple as a tuple, an IntEnum as an int)
_BASES = ((int, int.__index__), (float, float.__float__), (str, str.__str__),
          (bytes, bytes.__bytes__), (tuple, lambda v: tuple(tuple.__iter__(v))),
          (list, lambda v: list(list.__iter__(v))), (set, lambda v: set(set.__iter__(v))),
          (frozenset, lambda v: frozenset(frozenset.__iter__(v))),
          (dict, lambda v: dict(dict.items(v))))


def _plain_value(value: object) -> object:
    """A numpy scalar's or a plain subclass's plain value (None for any other object)."""
    kind, numpy = type(value), sys.modules.get("numpy")
    if numpy is not None and kind.__module__ == "numpy" \
            and getattr(numpy, kind.__name__, None) is kind and isinstance(value, numpy.generic):
        item = value.item()  # type: ignore[attr-defined]  # numpy's own class: its own item()
        return item if type(item) in (*_SCALARS, float, complex) else None
    for base, read in _BASES:
        if isinstance(value, base):
            return read(value) if kind.__eq__ is base.__eq__ else None
    return None


def _builtin_name(value: object) -> bool:
    name = getattr(value, "__name__", None)
    return _crossing_builtin(name) is value


def decode(text: str, handle: Callable[[int], object]) -> object:
    """The value of a literal written by ``encode``; ``handle(n)`` stands for ``H(n)``.

    Raises ValueError on anything else (a name, an attribute, an arbitrary call).
    """
    try:
        tree = compile(text, "<value>", "eval", PyCF_ONLY_AST)
    except (SyntaxError, ValueError, MemoryError, RecursionError) as err:
        raise ValueError(f"not a literal value: {type(err).__name__}") from None
    try:
        return _decode(tree.body, handle)
    except RecursionError:
        raise ValueError("a value nested too deeply") from None
    except TypeError as err:  # an unhashable item of a set
        raise ValueError(str(err)) from None


def _decode(node, handle: Callable[[int], object]) -> object:
    kind = type(node).__name__
    if kind == "Constant":
        if type(node.value) not in (*_SCALARS, float, complex) or node.value is ...:
            raise ValueError(f"not a plain constant: {type(node.value).__name__}")
        return node.value
    if kind == "UnaryOp" and type(node.op).__name__ in ("USub", "UAdd") \
            and type(node.operand).__name__ == "Constant" \
            and type(node.operand.value) in (int, float):
        return -node.operand.value if type(node.op).__name__ == "USub" else node.operand.value
    if kind in ("List", "Tuple", "Set"):
        items = [_decode(item, handle) for item in node.elts]
        return {"List": list, "Tuple": tuple, "Set": set}[kind](items)
    if kind == "Dict":
        if any(key is None for key in node.keys):
            raise ValueError("a dict literal with ** is not a plain value")
        try:
            return {_decode(k, handle): _decode(v, handle) for k, v in zip(node.keys, node.values)}
        except TypeError as err:  # an unhashable key
            raise ValueError(str(err)) from None
    if kind == "Call":
        return _call(node, handle)
    raise ValueError(f"not a plain value: {kind}")


def _call(node, handle: Callable[[int], object]) -> object:
    name = node.func.id if type(node.func).__name__ == "Name" else ""
    if node.keywords or len(node.args) > 2:
        raise ValueError("not a plain value: a call")
    args = [_decode(arg, handle) for arg in node.args]
    if name == "H" and len(args) == 1 and type(args[0]) is int:
        return handle(args[0])
    if name == "float" and len(args) == 1 and args[0] in _SPECIAL_FLOATS:
        return float(args[0])  # type: ignore[arg-type]
    if name == "complex" and len(args) == 2 and all(type(a) in (int, float) for a in args):
        return complex(*args)  # type: ignore[arg-type]
    if name in ("set", "frozenset") and len(args) <= 1 and all(type(a) is set for a in args):
        return (set if name == "set" else frozenset)(*args)
    if name == "B" and len(args) == 1 and _crossing_builtin(args[0]) is not None:
        return _crossing_builtin(args[0])
    if name in _COLLECTIONS and len(args) == 1 \
            and type(args[0]) is (list if name in ("deque", "OrderedDict") else dict):
        import collections

        kind = getattr(collections, name)
        return kind(None, args[0]) if name == "defaultdict" else kind(args[0])
    raise ValueError(f"not a plain value: a call of {name or 'something'}")


class LineReader:
    """Lines from a descriptor, each at most ``limit`` bytes (a longer one raises ValueError)."""

    def __init__(self, fd: int, limit: int) -> None:
        self.fd, self.limit, self.buffer = fd, limit, bytearray()

    def line(self) -> str | None:
        """The next line without its newline; None at end of file."""
        import os

        while True:
            end = self.buffer.find(b"\n")
            if end >= 0:
                line = bytes(self.buffer[:end])
                del self.buffer[:end + 1]
                return line.decode("utf-8", "replace")
            if len(self.buffer) > self.limit:
                raise ValueError(f"a message longer than {self.limit >> 20} MB")
            chunk = os.read(self.fd, 1 << 16)
            if not chunk:
                return None
            self.buffer += chunk


def write_line(fd: int, text: str) -> None:
    """``text`` and a newline, all of it (a pipe may take a long line in parts)."""
    import os

    data = memoryview((text + "\n").encode("utf-8", "backslashreplace"))
    while data:
        data = data[os.write(fd, data):]

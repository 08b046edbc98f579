"""The allowlists and guards of custom scripts (``script.py`` runs them and states the policy): which builtins and
module members a script gets, as read-only proxies and stand-ins, and the guarded attribute, item and iteration
access that RestrictedPython's compiled code calls. Everything reachable from a script goes through here."""

import _strptime  # noqa: F401  (preloaded: see C_INTERNAL_IMPORTS)
import builtins
import collections
import datetime
import functools
import inspect
import json
import math
import operator
import random
import re
import statistics
import string
import time  # noqa: F401  (preloaded: see C_INTERNAL_IMPORTS)
import types

from RestrictedPython import PrintCollector, limited_builtins, safe_builtins
from RestrictedPython.Guards import guarded_iter_unpack_sequence, guarded_unpack_sequence, safer_getattr_raise
from RestrictedPython.transformer import INSPECT_ATTRIBUTES

TRUNCATION_MARKER = "\n[... output truncated ...]"

# ---------------------------------------------------------------- allowlists

REMOVED_BUILTINS = ("id", "setattr", "delattr", "_getattr_", "SystemExit", "KeyboardInterrupt", "GeneratorExit")

DENIED_ATTRIBUTES = INSPECT_ATTRIBUTES | {  # refused on every object, even without a leading "_"
    "gi_frame", "gi_code", "gi_yieldfrom", "ag_frame", "ag_code", "ag_await", "cr_frame", "cr_code", "cr_await",
    "cr_origin", "f_globals", "f_locals", "f_back", "f_builtins", "f_code", "f_trace", "tb_frame", "tb_next",
    "cell_contents", "obj", "format", "format_map", "get_field", "get_value", "vformat", "mro",
}  # fmt: skip

WRITABLE_TYPES = frozenset({dict, list, set, bytearray, collections.Counter, collections.OrderedDict,
                            collections.defaultdict, collections.deque})  # fmt: skip

# Result containers (exact types: never script classes, whose methods are script code).
JSON_ARRAYS = frozenset({list, tuple, collections.deque})
JSON_OBJECTS = frozenset({dict, collections.Counter, collections.OrderedDict, collections.defaultdict})

MODULES = {  # import name -> the only names its proxy exposes
    "math": (
        "acos", "acosh", "asin", "asinh", "atan", "atan2", "atanh", "cbrt", "ceil", "comb", "copysign", "cos", "cosh",
        "degrees", "dist", "erf", "erfc", "exp", "exp2", "expm1", "fabs", "factorial", "floor", "fmod", "frexp",
        "fsum", "gamma", "gcd", "hypot", "isclose", "isfinite", "isinf", "isnan", "isqrt", "lcm", "ldexp", "lgamma",
        "log", "log10", "log1p", "log2", "modf", "nextafter", "perm", "pow", "prod", "radians", "remainder", "sin",
        "sinh", "sqrt", "tan", "tanh", "trunc", "ulp", "pi", "e", "tau", "inf", "nan",
    ),
    "json": ("dumps", "loads", "JSONDecodeError"),
    "re": ("match", "search", "findall", "finditer", "sub", "subn", "split", "fullmatch", "escape", "compile",
           "error", "IGNORECASE", "MULTILINE", "DOTALL", "VERBOSE"),
    "datetime": ("date", "time", "datetime", "timedelta", "timezone"),
    "statistics": ("mean", "fmean", "median", "mode", "stdev", "pstdev", "variance", "pvariance", "quantiles",
                   "StatisticsError"),
    "random": ("random", "randint", "randrange", "choice", "choices", "shuffle", "sample", "uniform"),
    "string": ("ascii_letters", "ascii_lowercase", "ascii_uppercase", "digits", "hexdigits", "octdigits",
               "punctuation", "whitespace", "printable", "capwords"),
    "collections": ("Counter", "OrderedDict", "defaultdict", "deque"),  # no namedtuple: it uses exec
    "functools": ("reduce",),
}  # fmt: skip

ITERABLE_ARGS = {  # callables that iterate arguments -> which positional arguments are iterables
    "all": "first", "any": "first", "dict": "first_unless_mapping", "enumerate": "first", "filter": "rest",
    "frozenset": "first", "list": "first", "map": "rest", "max": "sole", "min": "sole", "set": "first",
    "sorted": "first", "sum": "first", "tuple": "first", "zip": "all", "functools.reduce": "second",
}  # fmt: skip

_ITERABLE_POSITIONS = {
    "first": lambda args: range(min(len(args), 1)),
    "second": lambda args: range(1, min(len(args), 2)),
    "rest": lambda args: range(1, len(args)),
    "all": lambda args: range(len(args)),
    "sole": lambda args: range(1 if len(args) == 1 else 0),  # min(a, b) compares, min(xs) iterates
    "first_unless_mapping": lambda args: range(0 if args and isinstance(args[0], dict) else min(len(args), 1)),
}

INPLACE_OPERATORS = {
    "+=": operator.iadd, "-=": operator.isub, "*=": operator.imul, "/=": operator.itruediv,
    "//=": operator.ifloordiv, "%=": operator.imod, "**=": operator.ipow, "<<=": operator.ilshift,
    ">>=": operator.irshift, "&=": operator.iand, "|=": operator.ior, "^=": operator.ixor, "@=": operator.imatmul,
}  # fmt: skip

# C code importing on the script's behalf (datetime.strptime -> _strptime, timetuple -> time) calls the
# script's __import__ through PyImport_Import with fromlist=[] (a list: import statements pass None or a
# tuple), ignores the return value and reads sys.modules.  Such calls get None and load nothing.
C_INTERNAL_IMPORTS = frozenset({"_strptime", "time"})

_REAL_MODULES = {m.__name__: m for m in (collections, datetime, functools, json, math, re, statistics, string)}
WARM_CODECS = ("utf-8", "ascii", "latin-1", "utf-16", "utf-32")

# -------------------------------------------------------------------- guards


class ModuleProxy:
    """Read-only stand-in for an allowed module (never a module object)."""

    __slots__ = ()

    def _read_only(self, *args):
        raise AttributeError(f"{self!r} is read-only")

    __setattr__ = __delattr__ = _read_only


def _make_proxy(module_name, members):
    members = types.MappingProxyType(members)

    class module(ModuleProxy):  # one class per proxy; its name shows up in error messages
        __slots__ = ()

        def __getattr__(self, name):  # reached for every public name: the class defines only dunders
            if name in members:
                return members[name]
            raise AttributeError(
                f"module {module_name!r} has no attribute {name!r} here (allowed: {', '.join(members)})"
            )

        def __repr__(self):
            return f"<module {module_name!r} (sandbox proxy)>"

    return module()


def _guarded_getattr(ob, name, *default):
    if type(name) is not str:
        raise TypeError("attribute name must be a str")
    if name in DENIED_ATTRIBUTES:
        raise AttributeError(f'"{name}" is a restricted attribute name in this sandbox')
    return safer_getattr_raise(ob, name, *default)


def _guarded_hasattr(ob, name):
    try:
        _guarded_getattr(ob, name)
    except AttributeError:
        return False
    return True


def _guarded_getitem(ob, key):
    if isinstance(ob, ModuleProxy):
        raise TypeError("modules are not subscriptable")
    return ob[key]


def _guarded_iter(ob):
    if isinstance(ob, ModuleProxy):
        raise TypeError("modules are not iterable")
    return iter(ob)


def _iterating(fn, spec):
    """Wrap fn so the positional arguments chosen by spec reach it as guarded iterators."""
    positions = _ITERABLE_POSITIONS[spec]

    def call(*args, **kwargs):
        chosen = positions(args)
        return fn(*(_guarded_iter(a) if i in chosen else a for i, a in enumerate(args)), **kwargs)

    call.__name__ = call.__qualname__ = fn.__name__
    return call


class ClassStandIn:
    """A class whose plain-Python methods could be called unbound with any object as ``self`` (``Counter.copy(int)``
    returns ``type``): calls construct instances, isinstance sees the real class, and nothing else of the class is
    reachable, not even by subclassing (a subclass would hand out the same methods)."""

    __slots__ = ("_call", "_type")

    def __init__(self, typ, call=None):
        self._type, self._call = typ, call or typ

    def __call__(self, *args, **kwargs):
        return self._call(*args, **kwargs)

    def __instancecheck__(self, ob):
        return isinstance(ob, self._type)

    def __subclasscheck__(self, cls):
        return issubclass(cls, self._type)

    def __mro_entries__(self, bases):
        raise TypeError(f"{self._type.__name__} cannot be subclassed here")

    def __repr__(self):
        return repr(self._type)


class GuardedType(ClassStandIn):
    """A builtin type (C methods only) whose calls go through _iterating; class bases see the real type."""

    __slots__ = ()

    def __init__(self, typ, spec):
        super().__init__(typ, _iterating(typ, spec))

    def __mro_entries__(self, bases):
        return (self._type,)


@functools.cache  # decided once per class in the sandbox process (warm_up), not in every run
def exposes_python_code(cls):
    """True when a public attribute of ``cls`` is Python code that would take any ``self``: a plain function (an
    unbound method) or a property (whose fget/fset are such functions)."""
    for name in dir(cls):
        if name.startswith("_"):
            continue
        value = inspect.getattr_static(cls, name, None)
        if isinstance(value, (types.FunctionType, property)):
            return True
    return False


def _wrap_iterating(qualified_name, value):
    spec = ITERABLE_ARGS.get(qualified_name)
    if spec is not None:
        return GuardedType(value, spec) if isinstance(value, type) else _iterating(value, spec)
    if isinstance(value, type) and exposes_python_code(value):
        return ClassStandIn(value)
    return value


def _json_dumps(obj, *, indent=None, sort_keys=False, ensure_ascii=True):  # no default=/cls= hooks
    return json.dumps(obj, indent=indent, sort_keys=sort_keys, ensure_ascii=ensure_ascii)


def _json_loads(s):  # no object_hook=/cls= hooks
    return json.loads(s)


_MEMBER_OVERRIDES = {"json.dumps": _json_dumps, "json.loads": _json_loads}

BUILTINS = types.MappingProxyType(
    {name: value for name, value in {**safe_builtins, **limited_builtins}.items() if name not in REMOVED_BUILTINS}
    | {"range": range, "iter": _guarded_iter, "next": next, "getattr": _guarded_getattr, "hasattr": _guarded_hasattr}
    | {"reversed": lambda seq: reversed(list(_guarded_iter(seq)))}
    | {name: _wrap_iterating(name, getattr(builtins, name)) for name in ITERABLE_ARGS if "." not in name}
)


def _make_modules():
    sources = {**_REAL_MODULES, "random": random.Random()}  # fresh generator state per run
    proxies = {}
    for module_name, names in MODULES.items():
        members = {}
        for name in names:
            qualified = f"{module_name}.{name}"
            value = _MEMBER_OVERRIDES.get(qualified) or getattr(sources[module_name], name)
            if isinstance(value, re.RegexFlag):
                value = int(value)  # an enum member drags enum machinery along
            members[name] = _wrap_iterating(qualified, value)
        proxies[module_name] = _make_proxy(module_name, members)
    return proxies


def _utf8(text):
    """Replace lone surrogates (a script can print or raise them) so the reply always encodes as UTF-8."""
    return text.encode("utf-8", "replace").decode("utf-8")


class _Output(PrintCollector):
    """The one print target of a run (also for prints inside functions); keeps at most `limit` chars."""

    def __init__(self, limit):
        super().__init__()
        self.limit, self.size, self.truncated = limit, 0, False

    def write(self, text):
        if text and self.size < self.limit:
            self.txt.append(text[: self.limit - self.size])
        self.size += len(text)
        self.truncated = self.size > self.limit

    def flush(self):
        pass

    def _call_print(self, *objects, **kwargs):
        if kwargs.pop("file", None) is not None:
            raise TypeError("print(file=...) is not allowed")
        print(*objects, file=self, **kwargs)

    def report(self):
        text = _utf8("".join(self.txt))
        return {"stdout": text + TRUNCATION_MARKER if self.truncated else text, "truncated": self.truncated}


def _new_globals(params, output):
    script_classes = set()
    proxies = _make_modules()

    def make_class(name, bases, namespace, **kwargs):  # RestrictedPython adds metaclass=__metaclass__
        if kwargs:
            raise TypeError("class keyword arguments are not allowed")
        cls = type(name, bases, namespace)
        script_classes.add(cls)
        return cls

    def guarded_write(ob):
        if type(ob) in WRITABLE_TYPES or type(ob) in script_classes:
            return ob
        raise TypeError(f"cannot modify {type(ob).__name__} objects (only the script's own data)")

    def guarded_import(name, globals=None, locals=None, fromlist=(), level=0):
        if type(fromlist) is list and name in C_INTERNAL_IMPORTS:
            return None
        if level == 0 and name in proxies:
            return proxies[name]
        raise ImportError(f"import of {name!r} is not allowed; allowed modules: {', '.join(proxies)}")

    return {
        "__builtins__": {**BUILTINS, "__import__": guarded_import},
        "__name__": "custom_script",
        "__metaclass__": make_class,
        "_getattr_": _guarded_getattr,
        "_getitem_": _guarded_getitem,
        "_getiter_": _guarded_iter,
        "_iter_unpack_sequence_": guarded_iter_unpack_sequence,
        "_unpack_sequence_": guarded_unpack_sequence,
        "_write_": guarded_write,
        "_inplacevar_": lambda op, x, y: INPLACE_OPERATORS[op](x, y),
        "_print_": lambda _getattr_=None: output,
        "_apply_": lambda fn, *args, **kwargs: fn(*args, **kwargs),
        "params": params,
    }

"""Run one user-written "custom_script" under a RestrictedPython policy.

A POLICY layer, not the sandbox: it runs inside the OS-confined child, which
bounds CPU, memory, time and recursion (the recursion limit is left alone;
RecursionError and MemoryError are reported as runtime errors).  The script
reads ``params`` (a deep copy of plain JSON values), may ``print`` (captured)
and sets ``result`` (read from its globals afterwards, missing -> None).

Policy
  * Source: str, <= 64 KiB UTF-8, no NUL, compiled by compile_restricted_exec
    (all messages reported).  RestrictedPython 9.0 itself rejects "_" names
    and attributes, INSPECT_ATTRIBUTES (frames, code, generators), exec/eval,
    async code, nonlocal, try/except* (CVE-2025-22153), "_" positional-only
    parameters (CVE-2026-55830), star/lazy imports, metaclass=, match, and
    augmented assignment to attributes/items (write ``d[k] = d[k] + 1``).
  * Builtins: safe_builtins + limited_builtins minus REMOVED_BUILTINS (never
    utility_builtins: it holds real modules), plus builtin ``range`` (lazy;
    limited_range's 1000-item cap breaks ordinary loops), guarded getattr,
    hasattr, iter, reversed, plain next, and the ITERABLE_ARGS helpers, whose
    iterable arguments first go through ``_getiter_``.  Helpers that are
    types are stand-ins working with isinstance/issubclass and as base
    classes, exposing none of the type's attributes (no dict.fromkeys).
  * Attribute reads: safer_getattr ("_" names, str.format*, Formatter) plus
    DENIED_ATTRIBUTES.  Item reads and iteration: refused on module proxies.
  * Writes (attribute/item set and delete): only objects of WRITABLE_TYPES
    and instances of classes this run's script defined; never proxies,
    functions, classes, builtins.
  * Classes: allowed.  RestrictedPython permits only __init__, __contains__
    and comparison dunders in them and drops class keywords; each class is
    recorded (per run) so its instances are writable, the class is not.
  * Imports: only MODULES, as fresh per-run read-only proxies (not modules)
    of the listed names; re flags are plain ints, random is a fresh
    random.Random(), json has no default/cls/hook arguments.
  * Output: all prints of a run go to one collector keeping max_output
    characters; print(file=...) is refused.
  * Result: exact types only (JSON_OBJECTS with str keys, JSON_ARRAYS, str,
    int, float, bool, None), at most max_depth containers deep and
    max_result_bytes as JSON (no NaN); tuples and deques become lists.
  * Invariant relied upon: no mutable object shared between runs or with
    this module is reachable, so library code that writes or iterates without
    the guards (random.shuffle, str.join, list.extend, json.dumps, subclass
    constructors, ...) only ever touches the script's own data.
"""

import _strptime  # noqa: F401  (preloaded: see C_INTERNAL_IMPORTS)
import builtins
import codecs
import collections
import datetime
import functools
import gc
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
import unicodedata
import warnings

from RestrictedPython import PrintCollector, compile_restricted_exec, limited_builtins, safe_builtins
from RestrictedPython.Guards import guarded_iter_unpack_sequence, guarded_unpack_sequence, safer_getattr_raise
from RestrictedPython.transformer import INSPECT_ATTRIBUTES

__all__ = ["run_script", "warm_up"]

FILENAME = "<custom_script>"
MAX_SOURCE_BYTES = 64 * 1024
MAX_ERROR_CHARS = 8192
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


# ------------------------------------------------------------------- running


class _ResultError(Exception):
    pass


def _compile(source):
    """Return (code, errors)."""
    if not isinstance(source, str):
        return None, ["source must be a str"]
    if "\x00" in source:
        return None, ["source contains NUL bytes"]
    if len(source.encode("utf-8", "surrogatepass")) > MAX_SOURCE_BYTES:
        return None, [f"source is larger than {MAX_SOURCE_BYTES} bytes"]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            compiled = compile_restricted_exec(source, filename=FILENAME)
    except Exception as exc:  # too deeply nested (RecursionError), lone surrogates (UnicodeEncodeError), ...
        return None, [f"{type(exc).__name__}: {exc}"]
    return compiled.code, list(compiled.errors)


def _script_line(tb):
    line = None
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == FILENAME:
            line = tb.tb_lineno
        tb = tb.tb_next
    return line


def _plain_json(value, depth, max_depth, budget):
    """Copy value into fresh plain JSON types; budget[0] counts down a lower bound of the encoded size."""
    kind = type(value)
    budget[0] -= len(value) + 2 if kind is str else 1
    if budget[0] < 0:
        raise _ResultError("result is too large")
    if value is None or kind in (str, int, float, bool):
        return value
    if kind not in JSON_ARRAYS and kind not in JSON_OBJECTS:
        raise _ResultError(f"{kind.__name__} is not JSON-serialisable")
    if depth >= max_depth:
        raise _ResultError(f"result is nested deeper than {max_depth} levels")
    if kind in JSON_ARRAYS:
        return [_plain_json(item, depth + 1, max_depth, budget) for item in value]
    if any(type(key) is not str for key in value):
        raise _ResultError("result dict keys must be str")
    return {
        _plain_json(k, depth, max_depth, budget): _plain_json(v, depth + 1, max_depth, budget) for k, v in value.items()
    }


def _check_result(value, max_depth, max_result_bytes):
    try:
        plain = _plain_json(value, 0, max_depth, [max_result_bytes])
        size = len(json.dumps(plain, allow_nan=False, ensure_ascii=False).encode("utf-8"))
    except (ValueError, RecursionError, MemoryError) as exc:  # NaN, huge ints, lone surrogates, huge max_depth
        raise _ResultError(f"{type(exc).__name__}: {exc}") from None
    if size > max_result_bytes:
        raise _ResultError(f"result is too large ({size} > {max_result_bytes} bytes)")
    return plain


def _message(exc):
    """str(exc), or our own words when even that fails (a 5,000-digit int in its args, for one)."""
    try:
        return str(exc)
    except BaseException as inner:
        return f"(its message could not be shown: {type(inner).__name__})"


def _failure(error, line, output):
    if len(error) > MAX_ERROR_CHARS:
        error = error[:MAX_ERROR_CHARS] + TRUNCATION_MARKER
    return {"ok": False, "error": _utf8(error), "line": line, **output.report()}


def run_script(
    source: str, params: dict, *, max_output: int = 65536, max_result_bytes: int = 65536, max_depth: int = 20
) -> dict:
    """Compile and run one script; never raises for the script's faults (params must be JSON-serialisable)."""
    if not isinstance(params, dict):
        raise TypeError("params must be a dict")
    params = json.loads(json.dumps(params))  # deep copy as plain JSON types
    output = _Output(max_output)
    code, errors = _compile(source)
    if errors:
        found = re.match(r"Line (\d+):", errors[0])
        return _failure("compile_error: " + "\n".join(errors), int(found[1]) if found else None, output)
    script_globals = _new_globals(params, output)
    try:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                exec(code, script_globals)
        except BaseException as exc:  # the script's exceptions, RecursionError, MemoryError, SystemExit, ...
            line, message = _script_line(exc.__traceback__), _message(exc)
            error = f"runtime_error: {type(exc).__name__}" + (f": {message}" if message else "")
            return _failure(error + ("" if line is None else f" (line {line})"), line, output)
        try:
            result = _check_result(script_globals.get("result"), max_depth, max_result_bytes)
        except _ResultError as exc:
            return _failure(f"result_error: {exc}", None, output)
    finally:
        script_globals.clear()
        gc.collect()  # finalize the script's leftover generators now, not during the next run
    return {"ok": True, "result": result, **output.report()}


_WARM_UP_SCRIPT = """
import collections, datetime, functools, json, math, random, re, statistics, string
from math import sqrt
class Point:
    def __init__(self, x):
        self.x = x
def numbers():
    yield from [3, 1, 2]
ñ = Point(sqrt(params["n"]) + max(numbers()) + min(3, 4) + sum(sorted(numbers(), key=lambda v: -v)))
d = sorted(numbers())
when = datetime.datetime.strptime("2024-01-02", "%Y-%m-%d").replace(tzinfo=datetime.timezone.utc)
m = re.compile(r"(?P<w>\\w+)", re.IGNORECASE).search("Hello")
random.shuffle(d)
try:
    json.loads("{")
except json.JSONDecodeError as exc:
    print(f"{ñ.x:.2f} {when:%Y} {m.group('w')!r} {exc}", "%s" % when.timetuple().tm_year, math.pi)
result = [json.loads(json.dumps({"a": [1]}, indent=2)), re.sub(r"(l+)", r"<\\1>", "hello"), re.findall("o", "foo"),
    [statistics.mean(d), statistics.median(d), statistics.mode(d), statistics.stdev(d), statistics.pstdev(d),
     statistics.variance(d), statistics.pvariance(d), statistics.quantiles(d), statistics.fmean(d)],
    [random.random(), random.randint(1, 3), random.choice(d), random.sample(d, 2), random.uniform(0, 1)],
    string.capwords("a b"), collections.Counter("abca").most_common(1), functools.reduce(max, d, 0),
    dict(zip("ab", range(2))), list(reversed(tuple(set(frozenset(d))))), any(d), all(d),
    list(enumerate(filter(None, map(abs, d)))), isinstance(d, list), "é".encode("utf-16").decode("utf-16")]
"""


def warm_up() -> None:
    """Import and exercise everything a run needs; call before chroot (nothing may load lazily later)."""
    unicodedata.normalize("NFKC", "ñ")  # the parser needs it for non-ASCII identifiers
    for name in WARM_CODECS:
        codecs.lookup(name)
    ok = run_script(_WARM_UP_SCRIPT, {"n": 4})
    failures = [run_script(src, {}) for src in ("x = (", "x = 1 / 0", "result = {1}", "import os")]
    if not ok["ok"] or any(outcome["ok"] for outcome in failures):
        raise RuntimeError(f"sandbox warm-up failed: {ok} {failures}")

"""Run one user-written "custom_script" under a RestrictedPython policy (its allowlists and guards, named
below, are in ``script_guards.py``).

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

import codecs
import gc
import json
import re
import unicodedata
import warnings

from RestrictedPython import compile_restricted_exec

from .script_guards import JSON_ARRAYS, JSON_OBJECTS, TRUNCATION_MARKER, WARM_CODECS, _new_globals, _Output, _utf8

__all__ = ["run_script", "warm_up"]

FILENAME = "<custom_script>"
MAX_SOURCE_BYTES = 64 * 1024
MAX_ERROR_CHARS = 8192

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

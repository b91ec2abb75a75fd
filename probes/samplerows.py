"""The plain rows of a samples file read as text, many at once: `{"t_ns":T,"v":[i,n,...]}`, maybe with
`"x":[i,...]` before "v" (gpuscope.samples/2 rows that declare nothing and hold only numbers: 255 of
every 256 the writer makes).

Why as text: decoding such a row with `json.loads` makes a dict, a list and a Python number for each of
its ~25 values, and then each value is looked at again to build numpy columns; for a day at 1 s that
was most of the report's time, and a day at 5 ms is 17 million rows. Here a chunk's plain rows lose
their structural text in one `bytes.translate`, leaving one flat list of numbers for one decode (each
number read as JSON reads it, refused where JSON refuses it), and which number is a time, a stopped
index, an index or a value follows from each row's shape.

Only what JSON reads as plain rows is read here. A line is taken when its characters outside numbers
are exactly a plain row's (its "skeleton", the line with the characters of numbers deleted: judged once
per distinct skeleton, which also gives how many numbers each list holds), and then, for the chunk's
plain lines together, when each structural piece is found whole on every one of them (counted with
`bytes.count`: a digit inside a key or between a bracket and a comma fails the count), and when what is
left decodes as exactly the expected count of JSON numbers. A row that has the skeleton but is no plain
row (an odd "v") is left to the caller; where a chunk fails the later checks, it is all left to the
caller (None). The caller's line-by-line reading (as `load_timeline` reads) is the reference for
keyframes, declarations, events, Unavailable readings, whitespace, damaged and torn lines, old rows.

The numbers are decoded with orjson (4-5x faster than json on a list of numbers, and the same floats:
its ints beyond 64 bits come back as the correctly rounded float, which is what a column holds anyway),
or json where orjson is not installed; a chunk orjson refuses (an overflow to infinity, which json reads
as inf) is decoded again with json, so the readings are always json's.
"""
from __future__ import annotations

import itertools
import json
import operator
import re
from dataclasses import dataclass
from typing import Any, Callable

Loads = Callable[[bytes], Any]

# deleting these from a line leaves its skeleton: what is not part of a JSON number
_NUMBER_CHARS = b"0123456789.eE+-"
_PLAIN_SKELETON = re.compile(rb'\{"t_ns":,(?:"x":\[(,*)\],)?"v":\[(,*)\]\}')
# a plain row with its structure gone: T,i,...,i,n,...,n (and the line break a comma)
_STRUCTURE = b'{}[]"t_nsvx:'
_NEWLINE_TO_COMMA = bytes.maketrans(b"\n", b",")
_MAX_SKELETONS = 4096  # distinct skeletons remembered per reader (a file has a handful)


@dataclass(frozen=True)
class Shape:
    """What a line's skeleton says: a plain row or not; whether it has "x"; how many numbers its "x" and
    "v" lists hold when not empty (a skeleton's `[]` is an empty list or a list of one number)."""

    plain: bool
    has_x: bool = False
    stops: int = 0
    values: int = 0


NOT_PLAIN = Shape(False)


def shape_of(skeleton: bytes) -> Shape:
    match = _PLAIN_SKELETON.fullmatch(skeleton)
    if match is None:
        return NOT_PLAIN
    stops, values = match.groups()
    return Shape(True, stops is not None, len(stops) + 1 if stops is not None else 0, len(values) + 1)


@dataclass
class PlainRows:
    """The plain rows of a chunk of lines. `plain[i]`: line i was read here (else it is the caller's);
    for the plain lines, in order: `t_ns` (exact ints), `stop_counts` and `stops` (the "x" indices, as
    floats), `pair_counts` and `pairs` (the "v" list: index, value, index, value, ..., as floats)."""

    plain: Any
    t_ns: list[int]
    stop_counts: Any
    stops: Any
    pair_counts: Any
    pairs: Any


def default_loads() -> Loads:
    """The decoder of the flat lists: orjson's (a dependency; imported here, when a report reads samples,
    not when the command line starts), else json's where it is not installed."""
    try:
        import orjson
    except ImportError:  # pragma: no cover - depends on the environment
        return json.loads
    return orjson.loads


def plain_rows(lines: list[bytes], known: dict[bytes, Shape], np: Any, loads: Loads | None = None) -> PlainRows | None:
    """The plain rows among `lines` (lines of the file as bytes, each ending in a newline but maybe the
    last), or None when the chunk is left to the caller whole. Bytes: a plain row is ASCII, and bytes'
    translate and join take half the time of str's. `known` remembers skeletons' shapes between chunks
    (one dict per reader); `loads` decodes a JSON list of numbers (default_loads() when None)."""
    text = b"".join(lines)
    if not text.endswith(b"\n"):
        text += b"\n"
    skeletons = text.translate(None, _NUMBER_CHARS).split(b"\n")
    del skeletons[-1]  # after the last newline
    if len(skeletons) != len(lines):  # a line holding another line break: leave it all to the caller
        return None
    ids: dict[bytes, int] = {}
    shapes: list[Shape] = []
    for skeleton in set(skeletons):
        shape = known.get(skeleton)
        if shape is None:
            shape = shape_of(skeleton)
            if len(known) < _MAX_SKELETONS:
                known[skeleton] = shape
        ids[skeleton] = len(shapes)
        shapes.append(shape)
    of_line = np.fromiter(map(ids.__getitem__, skeletons), dtype=np.int64, count=len(skeletons))
    plain = np.array([s.plain for s in shapes], dtype=bool)[of_line]
    has_x = np.array([s.has_x for s in shapes], dtype=bool)[of_line]
    stops = np.array([s.stops for s in shapes], dtype=np.int64)[of_line]
    values = np.array([s.values for s in shapes], dtype=np.int64)[of_line]
    # a skeleton's "[]": an empty list where the line holds one, else a list of one number
    empty_x = _empty_where(lines, plain & has_x & (stops == 1), b',"x":[]', stops)
    empty_v = _empty_where(lines, plain & (values == 1), b',"v":[]}', values)
    plain &= values % 2 == 0  # an odd "v" is no plain row: the caller's (it is a damaged line)
    rows = int(plain.sum())
    if not rows:
        return PlainRows(plain, [], np.zeros(0, np.int64), np.zeros(0), np.zeros(0, np.int64), np.zeros(0))
    body = b"".join(itertools.compress(lines, plain.tolist()))
    if not body.endswith(b"\n"):
        body += b"\n"
    # every structural piece whole on every plain line (each line can hold each piece once at most)
    if (not body.startswith(b'{"t_ns":') or not body.endswith(b']}\n') or body.count(b']}\n{"t_ns":') != rows - 1
            or body.count(b',"v":[') != rows or not _x_whole(lines, plain & has_x)):
        return None
    if empty_x:
        body = body.replace(b',"x":[]', b"")
    if empty_v:
        body = body.replace(b',"v":[]}', b"}")
    stops, values = stops[plain], values[plain]
    counts = np.stack([np.ones(rows, dtype=np.int64), stops, values], axis=1)
    flat = b"[" + body.translate(_NEWLINE_TO_COMMA, _STRUCTURE)[:-1] + b"]"
    numbers = _decode(flat, loads or default_loads())
    if numbers is None or len(numbers) != int(counts.sum()):
        return None
    try:
        as_floats = np.asarray(numbers, dtype=np.float64)  # a third faster than np.fromiter on a list
    except (OverflowError, TypeError, ValueError):  # an int too large for a float
        return None
    starts = np.concatenate([[0], np.cumsum(counts.sum(axis=1))[:-1]])
    t_ns = list(operator.itemgetter(*starts.tolist())(numbers)) if rows > 1 else [numbers[0]]
    if set(map(type, t_ns)) != {int}:  # a time that is not an int: the chunk is the caller's
        return None
    kind = np.repeat(np.tile(np.array([0, 1, 2], dtype=np.int8), rows), counts.ravel())
    return PlainRows(plain=plain, t_ns=t_ns, stop_counts=stops, stops=as_floats[kind == 1],
                     pair_counts=values // 2, pairs=as_floats[kind == 2])


def _x_whole(lines: list[bytes], with_x: Any) -> bool:
    """The "x" list's pieces whole on every line flagged (a few lines: one a tick only where a reading stopped)."""
    return all(b',"x":[' in lines[i] and b'],"v":[' in lines[i] for i in with_x.nonzero()[0].tolist())


def _empty_where(lines: list[bytes], maybe: Any, empty: bytes, counts: Any) -> bool:
    """counts[i] = 0 for the lines flagged `maybe` whose text holds the empty list `empty`; whether any did."""
    found = False
    for i in maybe.nonzero()[0].tolist():
        if empty in lines[i]:
            counts[i] = 0
            found = True
    return found


def _decode(flat: bytes, loads: Loads) -> list[Any] | None:
    """The numbers of a flat JSON list, or None where JSON would not read it as one."""
    try:
        numbers = loads(flat)
    except ValueError:  # orjson.JSONDecodeError is one; json's too, and its int-digits limit
        if loads is json.loads:
            return None
        return _decode(flat, json.loads)  # orjson refuses what json reads as inf: json decides
    # only digits, signs, points, exponents and commas were left: a list of ints and floats, or an error
    return numbers if type(numbers) is list else None

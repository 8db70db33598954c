"""ORCA load reports over HTTP: the ``endpoint-load-metrics`` response header, parsed and formatted.

ORCA (Open Request Cost Aggregation, gRFC A51) lets a server tell its clients how loaded it is, in the
``xds.data.orca.v3.OrcaLoadReport`` message: CPU, memory and application utilization, queries and errors per
second, and opaque named metrics. gRPC sends it as the binary trailer ``endpoint-load-metrics-bin``; HTTP
servers send it as one response header whose value starts with its format, as Envoy's parser reads it
(``source/common/orca/orca_parser.cc``)::

    endpoint-load-metrics: TEXT cpu_utilization:0.7,rps_fractional:1000,named_metrics.foo:123
    endpoint-load-metrics: JSON {"cpu_utilization": 0.7, "named_metrics": {"foo": 123}}
    endpoint-load-metrics: BIN CZqZmZmZmdk/MQAAAAAAAElA...   (base64 of the serialized OrcaLoadReport)

A client may ask for a format with the request header ``endpoint-load-metrics-format: text|json|bin`` (the
convention Triton and vLLM serve; Envoy sends none and reads whatever arrives).

Everything here is bounded, because the header comes from a peer: :data:`MAX_HEADER_LENGTH` characters,
:data:`MAX_METRICS` named metrics, names of at most :data:`MAX_NAME_LENGTH` characters, finite values, and the
standard fields non-negative. :func:`parse_load_report` raises :class:`InvalidLoadReport` for anything else;
:func:`read_load_report` (the request path's entry) never raises: it logs an escaped excerpt at DEBUG and
returns :data:`INVALID`. ``BIN`` is decoded by hand from the protobuf wire format (the few fields of
``OrcaLoadReport``, unknown fields skipped, as protobuf parsers do), so no protobuf runtime is needed.
"""

from __future__ import annotations

import base64
import binascii
import enum
import json
import logging
import math
import re
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Final

__all__ = [
    "FORMAT_HEADER",
    "HEADER",
    "INVALID",
    "LEGACY_BIN_HEADER",
    "MAX_HEADER_LENGTH",
    "MAX_METRICS",
    "MAX_NAME_LENGTH",
    "InvalidLoadReport",
    "LoadReport",
    "ReportFormat",
    "decode_orca_proto",
    "encode_orca_proto",
    "format_load_report",
    "parse_load_report",
    "read_load_report",
    "requested_format",
]

logger = logging.getLogger("meshlib.balance.orca")

#: The response header carrying the report (Envoy's ``kEndpointLoadMetricsHeader``).
HEADER: Final = "endpoint-load-metrics"
#: gRPC's binary header (A51's trailer name), base64 with no prefix; Envoy reads it first when both are sent.
LEGACY_BIN_HEADER: Final = "endpoint-load-metrics-bin"
#: The request header a client sends to ask for a format (``text``, ``json`` or ``bin``, any case).
FORMAT_HEADER: Final = "endpoint-load-metrics-format"

#: Longest header value read (characters); longer ones are refused unread.
MAX_HEADER_LENGTH: Final = 8192
#: Most entries in each of the three maps (named_metrics, utilization, request_cost).
MAX_METRICS: Final = 64
#: Longest metric name (characters).
MAX_NAME_LENGTH: Final = 128
#: Largest value accepted (beyond any real utilization or rate; keeps weights finite).
MAX_VALUE: Final = 1e15
#: Characters of a refused header shown (escaped) in the DEBUG log.
EXCERPT: Final = 80


class ReportFormat(enum.Enum):
    """The three encodings of the header value; the value is its prefix word."""

    TEXT = "TEXT"
    JSON = "JSON"
    BIN = "BIN"


class InvalidLoadReport(ValueError):
    """A header value that is not a valid report (the message says why; never raised on the request path)."""


def _empty() -> Mapping[str, float]:
    return MappingProxyType({})


@dataclass(frozen=True, slots=True)
class LoadReport:
    """One immutable ``OrcaLoadReport``: proto3 semantics, so an unset field reads as ``0.0``.

    ``named_metrics`` are opaque application metrics; ``utilization`` and ``request_cost`` are the proto's other
    two maps (A51's per-request utilization and cost metrics). The maps are read-only.
    """

    cpu_utilization: float = 0.0
    mem_utilization: float = 0.0
    application_utilization: float = 0.0
    rps_fractional: float = 0.0
    eps: float = 0.0
    named_metrics: Mapping[str, float] = field(default_factory=_empty)
    utilization: Mapping[str, float] = field(default_factory=_empty)
    request_cost: Mapping[str, float] = field(default_factory=_empty)

    def __post_init__(self) -> None:
        for name in _SCALARS:
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                raise InvalidLoadReport(f"{name} must be a number, not {value!r}")
            _check_value(name, float(value), standard=True)
            object.__setattr__(self, name, float(value))
        for name in _MAPS:
            metrics = getattr(self, name)
            if len(metrics) > MAX_METRICS:
                raise InvalidLoadReport(f"{name} has {len(metrics)} entries (at most {MAX_METRICS})")
            frozen: dict[str, float] = {}
            for key, value in metrics.items():
                _check_name(f"{name}.{key}" if isinstance(key, str) else name, key)
                if not isinstance(value, (int, float)) or isinstance(value, bool):
                    raise InvalidLoadReport(f"{name}.{key} must be a number, not {value!r}")
                _check_value(f"{name}.{key}", float(value), standard=False)
                frozen[key] = float(value)
            object.__setattr__(self, name, MappingProxyType(frozen))

    def __hash__(self) -> int:
        return hash(tuple(getattr(self, name) for name in _SCALARS))

    def to_dict(self) -> dict[str, Any]:
        """The set fields as plain JSON-ready data (zero scalars and empty maps left out), for status views."""
        data: dict[str, Any] = {name: getattr(self, name) for name in _SCALARS if getattr(self, name)}
        for name in _MAPS:
            metrics = getattr(self, name)
            if metrics:
                data[name] = dict(metrics)
        return data

    @property
    def qps(self) -> float:
        """Queries per second (``rps_fractional``), the name A58's weight formula uses."""
        return self.rps_fractional

    @property
    def load_utilization(self) -> float:
        """A58's utilization: ``application_utilization`` when set (non-zero), else ``cpu_utilization``."""
        return self.application_utilization if self.application_utilization > 0.0 else self.cpu_utilization


#: Scalar fields by proto field number (all ``double``, wire type 1), in the order TEXT/JSON write them.
_FIELDS: Final = {
    1: "cpu_utilization",
    2: "mem_utilization",
    9: "application_utilization",
    6: "rps_fractional",
    7: "eps",
}
_SCALARS: Final = tuple(_FIELDS.values())
#: Map fields by proto field number (``map<string, double>``, wire type 2).
_MAP_FIELDS: Final = {8: "named_metrics", 5: "utilization", 4: "request_cost"}
_MAPS: Final = tuple(_MAP_FIELDS.values())
#: The deprecated ``uint64 rps = 3``: read and ignored (``rps_fractional`` replaced it).
_DEPRECATED_RPS: Final = 3
#: TEXT prefixes of map entries (Envoy reads ``named_metrics.``; the other two are accepted as well).
_TEXT_PREFIXES: Final = tuple(f"{name}." for name in _MAPS)
#: JSON names: the proto field name and its lowerCamelCase JSON name (proto3 JSON parsers accept both).
_JSON_NAMES: Final = {
    **{name: name for name in (*_SCALARS, *_MAPS, "rps")},
    **{re.sub(r"_([a-z])", lambda m: m.group(1).upper(), name): name for name in (*_SCALARS, *_MAPS, "rps")},
}
#: A TEXT number: decimal or exponent notation, no underscores, no ``nan``/``inf`` (checked apart).
_NUMBER: Final = re.compile(r"[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?", re.ASCII)
#: Metric names the TEXT format can carry (and a :class:`~meshlib.server.orca.LoadReporter` accepts).
TEXT_NAME: Final = re.compile(r"[A-Za-z0-9_.\-/]+", re.ASCII)


def _check_value(name: str, value: float, *, standard: bool) -> None:
    if math.isnan(value):
        raise InvalidLoadReport(f"{name} cannot be NaN")
    if math.isinf(value):
        raise InvalidLoadReport(f"{name} cannot be infinity")
    if abs(value) > MAX_VALUE:
        raise InvalidLoadReport(f"{name} is out of range ({value!r}; at most {MAX_VALUE:g})")
    if standard and value < 0.0:
        raise InvalidLoadReport(f"{name} cannot be negative ({value!r})")


def _check_name(where: str, name: object) -> None:
    if not isinstance(name, str):
        raise InvalidLoadReport(f"{where}: metric name must be a string")
    if not name:
        raise InvalidLoadReport(f"{where}: metric name is empty")
    if len(name) > MAX_NAME_LENGTH:
        raise InvalidLoadReport(f"{where[:MAX_NAME_LENGTH]}...: metric name is longer than {MAX_NAME_LENGTH}")


# -- parsing ---------------------------------------------------------------------------------------------------------


def parse_load_report(value: str) -> LoadReport:
    """The report in one ``endpoint-load-metrics`` value (``TEXT ...``, ``JSON ...`` or ``BIN ...``).

    Raises :class:`InvalidLoadReport` saying why for anything malformed, out of range or too large.
    """
    if len(value) > MAX_HEADER_LENGTH:
        raise InvalidLoadReport(f"header value is {len(value)} characters (at most {MAX_HEADER_LENGTH})")
    word, space, rest = value.partition(" ")
    if not space:
        raise InvalidLoadReport(f"unsupported ORCA header format: {value[:5]!r}")
    if word == "TEXT":
        return _parse_text(rest)
    if word == "JSON":
        return _parse_json(rest)
    if word == "BIN":
        return decode_orca_proto(_unbase64(rest))
    raise InvalidLoadReport(f"unsupported ORCA header format: {word[:5]!r}")


def parse_legacy_bin(value: str) -> LoadReport:
    """The report in gRPC's ``endpoint-load-metrics-bin`` header: base64, no prefix."""
    if len(value) > MAX_HEADER_LENGTH:
        raise InvalidLoadReport(f"header value is {len(value)} characters (at most {MAX_HEADER_LENGTH})")
    return decode_orca_proto(_unbase64(value))


#: What :func:`read_load_report` returns for a header that was present but not a valid report (an empty
#: report; compare with ``is``).
INVALID: Final = LoadReport()


def read_load_report(headers: Mapping[str, str] | Any) -> LoadReport | None:
    """The report in a response's headers: ``None`` when there is none, :data:`INVALID` when it is malformed.

    Never raises: a malformed report is logged at DEBUG (reason and an escaped excerpt) and ignored. As Envoy,
    ``endpoint-load-metrics-bin`` (gRPC's name) is read first when both headers are present.
    """
    raw: Any = None
    try:
        raw = headers.get(LEGACY_BIN_HEADER)
        legacy = raw is not None
        if not legacy:
            raw = headers.get(HEADER)
            if raw is None:
                return None
        if not isinstance(raw, str):
            raw = bytes(raw).decode("latin-1")
        return parse_legacy_bin(raw) if legacy else parse_load_report(raw)
    except Exception as error:  # anything a hostile peer can provoke; the request path must not see it
        if logger.isEnabledFor(logging.DEBUG):
            excerpt = "" if raw is None else str(raw)[:EXCERPT]
            logger.debug(
                "ignoring an invalid ORCA load report (%s): %s", error, excerpt.encode("unicode_escape").decode()
            )
        return INVALID


def _parse_text(body: str) -> LoadReport:
    """``name:value`` pairs (``name=value`` accepted too), comma-separated, whitespace around each ignored."""
    scalars: dict[str, float] = {}
    maps: dict[str, dict[str, float]] = {name: {} for name in _MAPS}
    seen: set[str] = set()
    for item in body.split(","):
        entry = item.strip(" \t")
        if not entry:
            continue  # Envoy's parseCommaDelimitedHeader skips empty elements
        cut = min((i for i in (entry.find(":"), entry.find("=")) if i >= 0), default=-1)
        name, value_text = (entry, "") if cut < 0 else (entry[:cut].strip(), entry[cut + 1 :].strip())
        if not name:
            raise InvalidLoadReport("metric names cannot be empty strings")
        if not value_text:
            raise InvalidLoadReport(f"metric value of {name[:MAX_NAME_LENGTH]!r} cannot be empty")
        if name in seen:
            raise InvalidLoadReport(f"duplicate metric: {name[:MAX_NAME_LENGTH]!r}")
        seen.add(name)
        value = _text_number(name, value_text)
        for prefix in _TEXT_PREFIXES:
            if name.startswith(prefix):
                key = name[len(prefix) :]
                target = maps[prefix[:-1]]
                _check_name(name, key)
                if len(target) >= MAX_METRICS:
                    raise InvalidLoadReport(f"more than {MAX_METRICS} {prefix[:-1]}")
                target[key] = value
                break
        else:
            if name not in _SCALARS:
                raise InvalidLoadReport(f"unsupported metric name: {name[:MAX_NAME_LENGTH]!r}")
            scalars[name] = value
    return LoadReport(**scalars, **maps)  # type: ignore[arg-type]


def _text_number(name: str, text: str) -> float:
    if _NUMBER.fullmatch(text) is None:
        lowered = text.lower().lstrip("+-")
        if lowered in ("nan",):
            raise InvalidLoadReport(f"{name[:MAX_NAME_LENGTH]} cannot be NaN")
        if lowered in ("inf", "infinity"):
            raise InvalidLoadReport(f"{name[:MAX_NAME_LENGTH]} cannot be infinity")
        raise InvalidLoadReport(f"unable to parse metric value of {name[:MAX_NAME_LENGTH]!r}: {text[:32]!r}")
    return float(text)


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise InvalidLoadReport(f"duplicate JSON key {key[:MAX_NAME_LENGTH]!r}")
        result[key] = value
    return result


def _json_number(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidLoadReport(f"{name[:MAX_NAME_LENGTH]} must be a JSON number")
    return float(value)


def _parse_json(body: str) -> LoadReport:
    """Proto3 JSON of ``OrcaLoadReport``: field or camelCase names, numbers only; unknown fields refused (Envoy)."""
    try:
        document = json.loads(body, object_pairs_hook=_no_duplicates)
    except InvalidLoadReport:
        raise
    except (ValueError, RecursionError) as error:
        raise InvalidLoadReport(f"invalid JSON: {error}") from None
    if not isinstance(document, dict):
        raise InvalidLoadReport("invalid JSON: not an object")
    scalars: dict[str, float] = {}
    maps: dict[str, dict[str, float]] = {}
    for key, value in document.items():
        name = _JSON_NAMES.get(key)
        if name is None:
            raise InvalidLoadReport(f"invalid JSON: unknown field {key[:MAX_NAME_LENGTH]!r}")
        if name == "rps":
            continue  # deprecated uint64; rps_fractional replaced it
        if name in _MAPS:
            if not isinstance(value, dict):
                raise InvalidLoadReport(f"{name} must be a JSON object")
            if len(value) > MAX_METRICS:
                raise InvalidLoadReport(f"more than {MAX_METRICS} {name}")
            maps[name] = {k: _json_number(f"{name}.{k}", v) for k, v in value.items()}
        else:
            scalars[name] = _json_number(name, value)
    return LoadReport(**scalars, **maps)  # type: ignore[arg-type]


def _unbase64(text: str) -> bytes:
    text = text.strip()
    if not text:
        raise InvalidLoadReport("ORCA binary header value is empty")
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidLoadReport("unable to decode ORCA binary header value (not base64)") from None
    if not data:
        raise InvalidLoadReport("ORCA binary header value is empty")
    return data


# -- the protobuf wire format ---------------------------------------------------------------------------------------

_DOUBLE = struct.Struct("<d")


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    """A base-128 varint at ``pos``: (value, next position); at most 10 bytes, as protobuf allows."""
    result = 0
    shift = 0
    end = len(data)
    while True:
        if pos >= end:
            raise InvalidLoadReport("truncated varint")
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result & 0xFFFFFFFFFFFFFFFF, pos
        shift += 7
        if shift >= 70:
            raise InvalidLoadReport("varint longer than 10 bytes")


def _fields(data: bytes) -> list[tuple[int, int, bytes | int]]:
    """``(field number, wire type, payload)`` for each field of one message; groups are refused."""
    result: list[tuple[int, int, bytes | int]] = []
    pos = 0
    end = len(data)
    while pos < end:
        tag, pos = _varint(data, pos)
        number, wire = tag >> 3, tag & 7
        if number == 0 or number > 0x1FFFFFFF:
            raise InvalidLoadReport(f"invalid field number {number}")
        payload: bytes | int
        if wire == 0:
            payload, pos = _varint(data, pos)
        elif wire == 1:
            if pos + 8 > end:
                raise InvalidLoadReport("truncated fixed64")
            payload, pos = data[pos : pos + 8], pos + 8
        elif wire == 2:
            length, pos = _varint(data, pos)
            if length > end - pos:
                raise InvalidLoadReport("truncated length-delimited field")
            payload, pos = data[pos : pos + length], pos + length
        elif wire == 5:
            if pos + 4 > end:
                raise InvalidLoadReport("truncated fixed32")
            payload, pos = data[pos : pos + 4], pos + 4
        else:
            raise InvalidLoadReport(f"unsupported wire type {wire} (field {number})")
        result.append((number, wire, payload))
    return result


def _map_entry(data: bytes) -> tuple[str, float]:
    """One ``map<string, double>`` entry: key (field 1) and value (field 2), unknown fields skipped."""
    key = b""
    value = 0.0
    for number, wire, payload in _fields(data):
        if number == 1 and wire == 2:
            assert isinstance(payload, bytes)
            key = payload
        elif number == 2 and wire == 1:
            assert isinstance(payload, bytes)
            value = _DOUBLE.unpack(payload)[0]
    try:
        return key.decode("utf-8"), value
    except UnicodeDecodeError:
        raise InvalidLoadReport("metric name is not valid UTF-8") from None


def decode_orca_proto(data: bytes) -> LoadReport:
    """A serialized ``xds.data.orca.v3.OrcaLoadReport``: the known fields read (last one wins, as protobuf
    merges), unknown fields and known fields of another wire type skipped; then checked like any report."""
    if len(data) > MAX_HEADER_LENGTH:
        raise InvalidLoadReport(f"serialized report is {len(data)} bytes (at most {MAX_HEADER_LENGTH})")
    scalars: dict[str, float] = {}
    maps: dict[str, dict[str, float]] = {name: {} for name in _MAPS}
    for number, wire, payload in _fields(data):
        name = _FIELDS.get(number)
        if name is not None:
            if wire == 1:
                assert isinstance(payload, bytes)
                scalars[name] = _DOUBLE.unpack(payload)[0]
            continue
        map_name = _MAP_FIELDS.get(number)
        if map_name is not None and wire == 2:
            assert isinstance(payload, bytes)
            key, value = _map_entry(payload)
            target = maps[map_name]
            target[key] = value
            if len(target) > MAX_METRICS:
                raise InvalidLoadReport(f"more than {MAX_METRICS} {map_name}")
    return LoadReport(**scalars, **maps)  # type: ignore[arg-type]


def _tag(number: int, wire: int) -> bytes:
    return _encode_varint(number << 3 | wire)


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        bits = value & 0x7F
        value >>= 7
        if value:
            out.append(bits | 0x80)
        else:
            out.append(bits)
            return bytes(out)


def encode_orca_proto(report: LoadReport) -> bytes:
    """``report`` serialized as an ``OrcaLoadReport`` (fields in number order, zero scalars omitted, as proto3)."""
    out = bytearray()
    for number in sorted((*_FIELDS, *_MAP_FIELDS)):
        scalar = _FIELDS.get(number)
        if scalar is not None:
            value = getattr(report, scalar)
            if value != 0.0:
                out += _tag(number, 1) + _DOUBLE.pack(value)
            continue
        metrics: Mapping[str, float] = getattr(report, _MAP_FIELDS[number])
        for key, value in metrics.items():
            encoded = key.encode("utf-8")
            entry = _tag(1, 2) + _encode_varint(len(encoded)) + encoded + _tag(2, 1) + _DOUBLE.pack(value)
            out += _tag(number, 2) + _encode_varint(len(entry)) + entry
    return bytes(out)


# -- formatting -----------------------------------------------------------------------------------------------------


def format_load_report(report: LoadReport, fmt: ReportFormat = ReportFormat.TEXT) -> str:
    """``report`` as an ``endpoint-load-metrics`` value in ``fmt``; zero scalars are omitted (proto3).

    TEXT writes ``name:value`` (the separator Envoy's parser splits on); its map keys must match
    :data:`TEXT_NAME` (:class:`ValueError` otherwise).
    """
    if fmt is ReportFormat.BIN:
        return "BIN " + base64.b64encode(encode_orca_proto(report)).decode("ascii")
    if fmt is ReportFormat.JSON:
        return "JSON " + json.dumps(report.to_dict(), separators=(",", ":"), allow_nan=False)
    parts = [f"{name}:{getattr(report, name)!r}" for name in _SCALARS if getattr(report, name)]
    for name in _MAPS:
        for key, value in getattr(report, name).items():
            if TEXT_NAME.fullmatch(key) is None:
                raise ValueError(f"metric name {key!r} cannot be written in TEXT (expected {TEXT_NAME.pattern})")
            parts.append(f"{name}.{key}:{value!r}")
    return "TEXT " + ",".join(parts)


def requested_format(value: str | None, default: ReportFormat = ReportFormat.TEXT) -> ReportFormat:
    """The format an ``endpoint-load-metrics-format`` request header asks for (``default`` if absent or unknown)."""
    if value:
        try:
            return ReportFormat[value.strip().upper()]
        except KeyError:
            pass
    return default

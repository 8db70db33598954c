"""The ``endpoint-load-metrics`` header: Envoy's test vectors (``test/common/orca/orca_parser_test.cc`` and its fuzz
corpus), each format both ways, hostile inputs, and the hand-written protobuf decoder against xds-protos."""

from __future__ import annotations

import base64
import contextlib
import logging
import math
import random
import struct

import pytest

from meshlib.balance.orca import (
    INVALID,
    MAX_HEADER_LENGTH,
    MAX_METRICS,
    InvalidLoadReport,
    LoadReport,
    ReportFormat,
    decode_orca_proto,
    encode_orca_proto,
    format_load_report,
    parse_load_report,
    read_load_report,
    requested_format,
)

pytestmark = pytest.mark.one_library

#: Envoy's ``exampleOrcaLoadReport()``.
EXAMPLE = LoadReport(
    cpu_utilization=0.7,
    application_utilization=0.8,
    mem_utilization=0.9,
    eps=2,
    rps_fractional=1000,
    named_metrics={"foo": 123, "bar": 0.2},
)


def test_envoy_text_vector() -> None:
    value = (
        "TEXT cpu_utilization:0.7,application_utilization:0.8,mem_utilization:0.9,rps_fractional:1000,eps:2,"
        "named_metrics.foo:123,named_metrics.bar:0.2"
    )
    assert parse_load_report(value) == EXAMPLE


def test_text_with_equals_and_spaces() -> None:
    # Triton's documented form (and Envoy's fuzz corpus): name=value, ", " between entries
    value = (
        "TEXT cpu_utilization=0.3, mem_utilization=0.8, rps_fractional=10.0, eps=1, "
        "named_metrics.custom_metric_util=0.4"
    )
    got = parse_load_report(value)
    assert (got.cpu_utilization, got.mem_utilization, got.rps_fractional, got.eps) == (0.3, 0.8, 10.0, 1.0)
    assert dict(got.named_metrics) == {"custom_metric_util": 0.4}


def test_envoy_json_vector() -> None:
    value = (
        'JSON {"cpu_utilization": 0.7, "application_utilization": 0.8, "mem_utilization": 0.9, '
        '"rps_fractional": 1000, "eps": 2, "named_metrics": {"foo": 123,"bar": 0.2}}'
    )
    assert parse_load_report(value) == EXAMPLE
    camel = (
        'JSON {"cpuUtilization": 0.7, "applicationUtilization": 0.8, "memUtilization": 0.9, '
        '"rpsFractional": 1000, "eps": 2, "namedMetrics": {"foo": 123, "bar": 0.2}}'
    )
    assert parse_load_report(camel) == EXAMPLE


def test_envoy_bin_corpus_vector() -> None:
    # test/common/orca/orca_parser_corpus/valid_bin2: cpu 0.4, rps_fractional 50, named_metrics {foo: 0.5}
    got = parse_load_report("BIN CZqZmZmZmdk/MQAAAAAAAElAQg4KA2ZvbxEAAAAAAADgPw==")
    assert got == LoadReport(cpu_utilization=0.4, rps_fractional=50, named_metrics={"foo": 0.5})


def test_legacy_bin_header_read_first() -> None:
    blob = base64.b64encode(encode_orca_proto(EXAMPLE)).decode()
    headers = {"endpoint-load-metrics": "TEXT cpu_utilization:0.1", "endpoint-load-metrics-bin": blob}
    assert read_load_report(headers) == EXAMPLE  # Envoy's BinHeaderPrecedence


@pytest.mark.parametrize("fmt", list(ReportFormat))
def test_every_format_round_trips(fmt: ReportFormat) -> None:
    report = LoadReport(
        cpu_utilization=1.5,
        application_utilization=0.25,
        rps_fractional=123.456,
        eps=1e-5,
        named_metrics={"queue.depth": 17, "a-b/c_d": -2.5},
        utilization={"gpu": 0.5},
        request_cost={"db": 3},
    )
    value = format_load_report(report, fmt)
    assert value.startswith(fmt.value + " ")
    assert parse_load_report(value) == report


def test_text_is_written_as_envoy_reads_it() -> None:
    value = format_load_report(LoadReport(cpu_utilization=0.5, rps_fractional=10, named_metrics={"foo": 1}))
    assert value == "TEXT cpu_utilization:0.5,rps_fractional:10.0,named_metrics.foo:1.0"
    assert format_load_report(LoadReport()) == "TEXT "
    assert parse_load_report("TEXT ") == LoadReport()
    with pytest.raises(ValueError, match="cannot be written in TEXT"):
        format_load_report(LoadReport(named_metrics={"a,b": 1}))


@pytest.mark.parametrize(
    ("value", "why"),
    [
        ("", "unsupported ORCA header format"),
        ("BAD random-value", "unsupported ORCA header format: 'BAD'"),
        ("BADBAD random-value", "unsupported ORCA header format: 'BADBA'"),
        ('TEXT cpu_utilization:"0.7"', "unable to parse"),
        ("TEXT cpu_utilization:nan", "cannot be NaN"),
        ("TEXT cpu_utilization:inf", "cannot be infinity"),
        ("TEXT cpu_utilization:-Infinity", "cannot be infinity"),
        ("TEXT cpu_utilization:0.7,cpu_utilization:0.8", "duplicate metric"),
        ("TEXT named_metrics.foo:123,named_metrics.duplicate:123,named_metrics.duplicate:0.2", "duplicate metric"),
        ("TEXT cpu_utilization:0.7,unsupported_metric:0.8", "unsupported metric name"),
        ("TEXT named_metrics.:123", "metric name is empty"),
        ("TEXT not-a-list-of-key-value-pairs", "cannot be empty"),
        ("TEXT :1", "metric names cannot be empty"),
        ("TEXT cpu_utilization:1_000", "unable to parse"),
        ("TEXT cpu_utilization:-0.5", "cannot be negative"),
        ("TEXT cpu_utilization:1e300", "out of range"),
        ("JSON not-a-valid-json-string", "invalid JSON"),
        ('JSON {"cpu_utilization": 0.7, "unknown_field": 2}', "unknown field"),
        ('JSON {"cpu_utilization": "0.7"}', "must be a JSON number"),
        ('JSON {"cpu_utilization": 0.7', "invalid JSON"),
        ('JSON {"cpu_utilization": 0.7, "cpu_utilization": 0.8}', "duplicate JSON key"),
        ('JSON {"cpu_utilization": 1e999}', "infinity"),
        ('JSON {"cpu_utilization": NaN}', "NaN"),
        ('JSON {"eps": true}', "must be a JSON number"),
        ("JSON [1]", "not an object"),
        ("JSON " + "[" * 5000, "invalid JSON"),
        ('JSON {"cpu_utilization": ' + "9" * 5000 + "}", "invalid JSON"),
        ('JSON {"named_metrics": [1]}', "must be a JSON object"),
        ("BIN ", "empty"),
        ("BIN not-a-valid-binary-proto", "not base64"),
        ("BIN " + base64.b64encode(b"\x0b").decode(), "wire type 3"),  # a group
        ("BIN " + base64.b64encode(b"\x09\x00\x00").decode(), "truncated fixed64"),
        ("BIN " + base64.b64encode(b"\x42\x7f").decode(), "truncated length-delimited"),
        ("BIN " + base64.b64encode(b"\x18" + b"\xff" * 11).decode(), "varint longer than 10 bytes"),
        ("BIN " + base64.b64encode(b"\x00").decode(), "invalid field number 0"),
        ("BIN " + base64.b64encode(b"\x09" + struct.pack("<d", math.nan)).decode(), "cannot be NaN"),
        ("BIN " + base64.b64encode(b"\x42\x05\x0a\x03\xff\xfe\xfd").decode(), "not valid UTF-8"),
    ],
)
def test_invalid_values_are_refused_with_a_reason(value: str, why: str) -> None:
    with pytest.raises(InvalidLoadReport, match=why):
        parse_load_report(value)


def test_bounds_on_size_and_count() -> None:
    with pytest.raises(InvalidLoadReport, match="at most 8192"):
        parse_load_report("TEXT " + "x" * MAX_HEADER_LENGTH)
    many = ",".join(f"named_metrics.m{i}:1" for i in range(MAX_METRICS + 1))
    with pytest.raises(InvalidLoadReport, match=f"more than {MAX_METRICS}"):
        parse_load_report("TEXT " + many)
    entries = b"".join(
        b"\x42" + bytes([len(e)]) + e
        for e in (
            b"\x0a\x03m" + str(i).zfill(2).encode() + b"\x11" + struct.pack("<d", 1.0) for i in range(MAX_METRICS + 1)
        )
    )
    with pytest.raises(InvalidLoadReport, match=f"more than {MAX_METRICS}"):
        decode_orca_proto(entries)
    with pytest.raises(InvalidLoadReport, match="longer than 128"):
        parse_load_report("TEXT named_metrics." + "n" * 200 + ":1")


def test_unknown_fields_and_other_wire_types_are_skipped() -> None:
    data = (
        b"\x18\x07"  # deprecated uint64 rps = 3
        + b"\xf8\x01\x05"  # field 31, varint: unknown
        + b"\x0d\x00\x00\x80\x3f"  # field 1 as fixed32: not a double, skipped as protobuf does
        + b"\x09"
        + struct.pack("<d", 0.25)
        + b"\x09"
        + struct.pack("<d", 0.5)  # repeated: the last wins
        + b"\x42\x0c\x0a\x01k\x11"
        + struct.pack("<d", 2.0)
    )
    assert decode_orca_proto(data) == LoadReport(cpu_utilization=0.5, named_metrics={"k": 2.0})


def test_read_load_report_never_raises_and_logs_an_escaped_excerpt(caplog: pytest.LogCaptureFixture) -> None:
    assert read_load_report({}) is None
    with caplog.at_level(logging.DEBUG, logger="meshlib.balance.orca"):
        assert read_load_report({"endpoint-load-metrics": "TEXT cpu_utilization:nan\x1b[31m"}) is INVALID
        assert read_load_report({"endpoint-load-metrics": "BIN " + "A" * 100_000}) is INVALID
        assert read_load_report({"endpoint-load-metrics-bin": "%%%"}) is INVALID
    assert "\\x1b[31m" in caplog.text and "\x1b" not in caplog.text
    assert len(caplog.records) == 3
    assert all(len(r.getMessage()) < 400 for r in caplog.records)
    valid = read_load_report({"endpoint-load-metrics": "TEXT eps:1"})
    assert valid == LoadReport(eps=1) and valid is not INVALID


def test_hostile_random_bytes_never_escape_as_other_errors() -> None:
    rng = random.Random(51)
    for _ in range(3000):
        blob = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 40)))
        with contextlib.suppress(InvalidLoadReport):
            decode_orca_proto(blob)
        text = "TEXT " + "".join(rng.choice("cpu_tilzaon.:=,0123456789e-+ ") for _ in range(30))
        assert read_load_report({"endpoint-load-metrics": text}) is not None


def test_requested_format() -> None:
    assert requested_format(None) is ReportFormat.TEXT
    assert requested_format("json") is ReportFormat.JSON
    assert requested_format(" Bin ") is ReportFormat.BIN
    assert requested_format("xml", ReportFormat.JSON) is ReportFormat.JSON


def test_load_report_is_immutable_and_checked() -> None:
    report = LoadReport(named_metrics={"a": 1})
    with pytest.raises(AttributeError):
        report.cpu_utilization = 1.0  # type: ignore[misc]
    with pytest.raises(TypeError):
        report.named_metrics["b"] = 2  # type: ignore[index]
    with pytest.raises(InvalidLoadReport, match="cannot be negative"):
        LoadReport(eps=-1)
    assert hash(report) == hash(LoadReport(named_metrics={"b": 2}))


class TestAgainstXdsProtos:
    """The hand-written wire decoder and encoder agree with protobuf's own (the ``xds`` extra)."""

    orca = pytest.importorskip("xds.data.orca.v3.orca_load_report_pb2", reason="xds-protos is in the xds extra")

    def proto(self, report: LoadReport) -> object:
        message = self.orca.OrcaLoadReport(
            cpu_utilization=report.cpu_utilization,
            mem_utilization=report.mem_utilization,
            application_utilization=report.application_utilization,
            rps_fractional=report.rps_fractional,
            eps=report.eps,
        )
        message.named_metrics.update(report.named_metrics)
        message.utilization.update(report.utilization)
        message.request_cost.update(report.request_cost)
        return message

    def test_envoy_example_both_ways(self) -> None:
        serialized = self.proto(EXAMPLE).SerializeToString()  # type: ignore[attr-defined]
        assert decode_orca_proto(serialized) == EXAMPLE
        parsed = self.orca.OrcaLoadReport.FromString(encode_orca_proto(EXAMPLE))
        assert parsed == self.proto(EXAMPLE)

    def test_random_reports_both_ways(self) -> None:
        rng = random.Random(58)
        for _ in range(300):
            report = LoadReport(
                cpu_utilization=rng.choice([0.0, rng.random() * 4]),
                mem_utilization=rng.choice([0.0, rng.random()]),
                application_utilization=rng.choice([0.0, rng.random() * 2]),
                rps_fractional=rng.choice([0.0, rng.random() * 1e5]),
                eps=rng.choice([0.0, rng.random() * 100]),
                named_metrics={f"m{i}": rng.uniform(-1e6, 1e6) for i in range(rng.randrange(5))},
                utilization={f"u{i}": rng.random() for i in range(rng.randrange(3))},
                request_cost={"ü" * (i + 1): rng.random() for i in range(rng.randrange(3))},
            )
            message = self.proto(report)
            assert decode_orca_proto(message.SerializeToString()) == report  # type: ignore[attr-defined]
            assert self.orca.OrcaLoadReport.FromString(encode_orca_proto(report)) == message

    def test_unknown_fields_skipped_like_protobuf(self) -> None:
        message = self.proto(EXAMPLE)
        data = message.SerializeToString() + b"\xf8\x01\x05" + b"\xfa\x01\x02hi" + b"\xfd\x01\x00\x00\x00\x00"  # type: ignore[attr-defined]
        parsed = self.orca.OrcaLoadReport.FromString(data)  # protobuf parses it: so must we
        parsed.DiscardUnknownFields()
        assert parsed == message
        assert decode_orca_proto(data) == EXAMPLE

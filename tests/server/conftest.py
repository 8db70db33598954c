"""The telemetry suite's OpenTelemetry SDK fixtures (in-memory exporter and reader), for the inbound tests here."""

from tests.telemetry.conftest import metrics, traces  # noqa: F401  (fixtures)

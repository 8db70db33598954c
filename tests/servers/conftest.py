"""Fixtures shared with the Workload API client tests: a short socket directory and an example.org CA."""

from tests.security.test_workload_api import ca, socket_dir  # noqa: F401  (fixtures)

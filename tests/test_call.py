"""The per-call pieces that have a fast path: the endpoint URL must equal httpx's own ``copy_with``."""

from __future__ import annotations

import pytest

from meshlib._plan import endpoint_url
from meshlib.discovery.base import Endpoint
from tests.httplib import httpx


@pytest.mark.parametrize(
    "url",
    [
        "http://payments/charge",
        "https://payments/charge?x=1&y=%20z#frag",
        "http://user:pw@payments:8080/a/b/",
        "http://PAYMENTS/",
        "https://payments.internal/path%2Fencoded",
    ],
)
@pytest.mark.parametrize(
    "endpoint",
    [Endpoint("10.0.0.5", 8080), Endpoint("::1", 9000), Endpoint("127.0.0.1", 80), Endpoint("Host.Example", 443)],
)
def test_endpoint_url_matches_copy_with(url: str, endpoint: Endpoint) -> None:
    original = httpx.URL(url)
    fast = endpoint_url(original, endpoint)
    slow = original.copy_with(host=endpoint.url_host, port=endpoint.port)
    assert fast == slow
    assert str(fast) == str(slow)
    assert fast.raw_path == slow.raw_path and fast.netloc == slow.netloc
    assert str(original) == str(httpx.URL(url))  # the caller's URL is untouched

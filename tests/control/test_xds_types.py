"""The ADS client's view of the four resource types: unpack (and unwrap ``Resource``), name, validate."""

from __future__ import annotations

import pytest

pytest.importorskip("envoy.config.cluster.v3.cluster_pb2")
from envoy.config.cluster.v3 import cluster_pb2
from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf import any_pb2

from meshlib.control.xds.resources.cds import ClusterUpdate
from meshlib.control.xds.resources.errors import XdsResourceError
from meshlib.control.xds.types import RESOURCE_WRAPPER, cluster_type, endpoints_type, listener_type
from tests.servers import xds_resources as r

pytestmark = pytest.mark.one_library


def packed(message: object) -> any_pb2.Any:
    value = any_pb2.Any()
    value.Pack(message)
    return value


def test_a_valid_cluster_decodes_to_its_name_and_update() -> None:
    name, update = cluster_type().decode(packed(r.cluster("payments", lb_policy="ring_hash")))
    assert name == "payments" and isinstance(update, ClusterUpdate) and update.lb == "ring_hash"


def test_a_resource_wrapper_is_unwrapped() -> None:
    wrapper = discovery_pb2.Resource(name="payments", version="7")
    wrapper.resource.Pack(r.cluster("payments"))
    outer = any_pb2.Any(type_url=RESOURCE_WRAPPER, value=wrapper.SerializeToString())
    assert cluster_type().decode(outer)[0] == "payments"


def test_an_invalid_resource_names_itself_so_only_it_is_nacked() -> None:
    bad = r.cluster("payments")
    bad.lb_policy = cluster_pb2.Cluster.MAGLEV
    with pytest.raises(XdsResourceError) as caught:
        cluster_type().decode(packed(bad))
    assert caught.value.name == "payments" and "lb_policy" in str(caught.value)


def test_the_wrong_type_and_bytes_that_do_not_parse_are_refused() -> None:
    with pytest.raises(XdsResourceError, match=r"expected type\.googleapis\.com/envoy\.config\.listener\.v3\.Listener"):
        listener_type().decode(packed(r.cluster("payments")))
    garbage = any_pb2.Any(type_url=endpoints_type().type_url, value=b"\xff\xff\xff")
    with pytest.raises(XdsResourceError, match="does not parse"):
        endpoints_type().decode(garbage)

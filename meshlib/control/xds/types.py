"""The four xDS resource types of gRFC A27 as the ADS client reads them: unpack, name, validate.

Each :class:`ResourceType` here turns one ``google.protobuf.Any`` of a ``DiscoveryResponse`` into ``(name, value)``
with the validators of :mod:`meshlib.control.xds.resources`. A resource may come wrapped in an
``envoy.service.discovery.v3.Resource`` (servers that speak the xdstp/delta forms do this in state of the world
too; gRPC unwraps it): it is unwrapped first. A resource whose bytes do not parse, whose type is not the one
asked for, or that fails validation raises :class:`~meshlib.control.xds.resources.errors.XdsResourceError` with the
resource's name when it could be read, so the client marks that resource NACKED and keeps its last good value.
"""

from __future__ import annotations

from collections.abc import Callable, Container
from dataclasses import dataclass
from typing import Any

from meshlib.control.xds.client import CLUSTER, CLUSTER_LOAD_ASSIGNMENT, LISTENER, ROUTE_CONFIGURATION
from meshlib.control.xds.resources.errors import XdsResourceError, shown

__all__ = ["RESOURCE_WRAPPER", "XdsType", "cluster_type", "endpoints_type", "listener_type", "route_type"]

RESOURCE_WRAPPER = "type.googleapis.com/envoy.service.discovery.v3.Resource"


@dataclass(frozen=True, slots=True)
class XdsType:
    """One resource type: its URL, whether a response lists every resource (LDS, CDS), the message class, how
    to read a resource's name, and the validator (raising :class:`XdsResourceError`)."""

    type_url: str
    all_in_response: bool
    message: Callable[[], Any]
    name_of: Callable[[Any], str]
    validate: Callable[[Any], object]

    def decode(self, resource: Any) -> tuple[str, object]:
        """``(name, validated value)`` of one ``Any`` from a response (see the module docstring)."""
        if resource.type_url == RESOURCE_WRAPPER:
            from envoy.service.discovery.v3 import discovery_pb2

            wrapper = discovery_pb2.Resource()
            try:
                wrapper.ParseFromString(resource.value)
            except Exception as exc:  # google.protobuf.message.DecodeError
                raise XdsResourceError("", f"a Resource wrapper that does not parse: {shown(str(exc))}") from None
            resource = wrapper.resource
        if resource.type_url != self.type_url:
            raise XdsResourceError("type_url", f"expected {self.type_url}, got {shown(resource.type_url)}")
        message = self.message()
        try:
            message.ParseFromString(resource.value)
        except Exception as exc:  # google.protobuf.message.DecodeError
            raise XdsResourceError("", f"the resource does not parse: {shown(str(exc))}") from None
        name = self.name_of(message)
        try:
            return name, self.validate(message)
        except XdsResourceError as error:
            if error.name is None:
                error.name = name
            raise


def listener_type() -> XdsType:
    """LDS: ``Listener`` -> :class:`~meshlib.control.xds.resources.lds.ListenerUpdate`."""
    from envoy.config.listener.v3 import listener_pb2

    from meshlib.control.xds.resources.lds import validate_listener

    return XdsType(LISTENER, True, listener_pb2.Listener, lambda m: str(m.name), validate_listener)


def route_type() -> XdsType:
    """RDS: ``RouteConfiguration`` -> :class:`~meshlib.control.xds.resources.rds.RouteConfigUpdate`."""
    from envoy.config.route.v3 import route_pb2

    from meshlib.control.xds.resources.rds import validate_route_configuration

    return XdsType(
        ROUTE_CONFIGURATION, False, route_pb2.RouteConfiguration, lambda m: str(m.name), validate_route_configuration
    )


def cluster_type(certificate_providers: Container[str] | None = None) -> XdsType:
    """CDS: ``Cluster`` -> :class:`~meshlib.control.xds.resources.cds.ClusterUpdate`; ``certificate_providers``
    are the bootstrap's instance names (a TLS context naming another one is NACKed, A29)."""
    from envoy.config.cluster.v3 import cluster_pb2

    from meshlib.control.xds.resources.cds import validate_cluster

    return XdsType(
        CLUSTER,
        True,
        cluster_pb2.Cluster,
        lambda m: str(m.name),
        lambda m: validate_cluster(m, certificate_providers=certificate_providers),
    )


def endpoints_type() -> XdsType:
    """EDS: ``ClusterLoadAssignment`` -> :class:`~meshlib.control.xds.resources.eds.EndpointsUpdate`."""
    from envoy.config.endpoint.v3 import endpoint_pb2

    from meshlib.control.xds.resources.eds import validate_load_assignment

    return XdsType(
        CLUSTER_LOAD_ASSIGNMENT,
        False,
        endpoint_pb2.ClusterLoadAssignment,
        lambda m: str(m.cluster_name),
        validate_load_assignment,
    )

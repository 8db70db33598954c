"""meshlib.control.xds.bootstrap: gRPC's xDS bootstrap read with gRPC's rules.

gRPC's documented examples (grpc_xds_bootstrap_format.md, A29, A47), every error path (each names the source, the
field path, the value and what was expected), the precedence of the two variables, xdstp templates, file_watcher
providers, channels to real loopback gRPC servers (plaintext and mutual TLS), and a differential check against
grpcio's C-core reading the same bootstraps.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest
import trustme

from meshlib import ConfigError
from meshlib.control.xds import (
    Bootstrap,
    BootstrapError,
    CertificateFiles,
    XdsServer,
    channel_for,
    from_env,
    parse_bootstrap,
)
from meshlib.control.xds.bootstrap import CLIENT_FEATURES, MAX_BOOTSTRAP_BYTES

pytestmark = pytest.mark.one_library

INSECURE = {"server_uri": "127.0.0.1:1", "channel_creds": [{"type": "insecure"}]}


def base() -> dict[str, Any]:
    return {"xds_servers": [copy.deepcopy(INSECURE)], "node": {"id": "n1"}}


def parse(doc: object, source: str = "GRPC_XDS_BOOTSTRAP_CONFIG") -> Bootstrap:
    return parse_bootstrap(json.dumps(doc), source=source)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, as PEM files."""
    root = tmp_path_factory.mktemp("pki")
    ca = trustme.CA()
    server = ca.issue_cert("127.0.0.1", "localhost")
    client = ca.issue_cert("client.example")
    other_ca = trustme.CA()
    files = {
        "ca": ca.cert_pem,
        "other_ca": other_ca.cert_pem,
        "server_cert": server.cert_chain_pems[0],
        "server_key": server.private_key_pem,
        "client_cert": client.cert_chain_pems[0],
        "client_key": client.private_key_pem,
    }
    paths = {}
    for name, blob in files.items():
        path = root / f"{name}.pem"
        blob.write_to_path(str(path))
        paths[name] = str(path)
    return paths


# -- gRPC's documented examples -----------------------------------------------------------------------------------


def test_the_format_documents_full_example(pki: dict[str, str]) -> None:
    """Every field of grpc_xds_bootstrap_format.md, with real files for the tls creds and the provider."""
    doc = {
        "xds_servers": [
            {
                "server_uri": "xds.example.com:443",
                "channel_creds": [
                    {"type": "future_creds_type", "config": {"anything": 1}},
                    {
                        "type": "tls",
                        "config": {
                            "ca_certificate_file": pki["ca"],
                            "certificate_file": pki["client_cert"],
                            "private_key_file": pki["client_key"],
                            "refresh_interval": "30s",
                        },
                    },
                    {"type": "insecure"},
                ],
                "server_features": ["xds_v3", "ignore_resource_deletion", "trusted_xds_server", "future", 7],
            },
            {"server_uri": "fallback.example.com:443", "channel_creds": [{"type": "insecure"}]},
        ],
        "node": {
            "id": "projects/1/networks/default/nodes/abc",
            "cluster": "cluster-a",
            "locality": {"region": "r1", "zone": "z1", "sub_zone": "s1"},
            "metadata": {"TRAFFICDIRECTOR_NETWORK_NAME": "default", "nested": {"list": [1, "two", None]}},
            "user_agent_name": "ignored: the client fills it",
        },
        "certificate_providers": {
            "google_cloud_private_spiffe": {
                "plugin_name": "file_watcher",
                "config": {
                    "certificate_file": pki["client_cert"],
                    "private_key_file": pki["client_key"],
                    "ca_certificate_file": pki["ca"],
                    "refresh_interval": "60s",
                },
            }
        },
        "server_listener_resource_name_template": "example/resource/%s",
        "client_default_listener_resource_name_template": "%s",
        "authorities": {},
        "a_future_top_level_field": {"ignored": True},
    }
    boot = parse(doc, source="GRPC_XDS_BOOTSTRAP=/etc/x.json")
    first, second = boot.servers
    assert first.server_uri == "xds.example.com:443"
    assert first.channel_creds.type == "tls"
    assert first.channel_creds.listed == ("future_creds_type", "tls", "insecure")
    assert first.channel_creds.tls == CertificateFiles(pki["client_cert"], pki["client_key"], pki["ca"], 30.0)
    assert first.server_features == {"xds_v3", "ignore_resource_deletion", "trusted_xds_server"}
    assert first.ignore_resource_deletion and first.trusted_xds_server
    assert second.channel_creds.type == "insecure" and not second.ignore_resource_deletion
    node = boot.node
    assert (node.id, node.cluster) == ("projects/1/networks/default/nodes/abc", "cluster-a")
    assert (node.locality.region, node.locality.zone, node.locality.sub_zone) == ("r1", "z1", "s1")
    assert node.metadata["nested"]["list"] == (1, "two", None)
    with pytest.raises(TypeError):
        node.metadata["x"] = 1  # type: ignore[index]
    assert node.user_agent_name == "meshlib" and node.user_agent_version.startswith("0.")
    assert node.client_features == CLIENT_FEATURES
    provider = boot.certificate_providers["google_cloud_private_spiffe"]
    assert provider.plugin_name == "file_watcher"
    assert provider.files == CertificateFiles(pki["client_cert"], pki["client_key"], pki["ca"], 60.0)
    assert boot.server_listener_resource_name_template == "example/resource/%s"
    assert boot.client_default_listener_resource_name_template == "%s"
    assert boot.source == "GRPC_XDS_BOOTSTRAP=/etc/x.json"
    assert boot.listener_for("xds:///payments").resource_name == "payments"
    assert boot.listener_for("xds:///payments").servers == boot.servers


def test_a27_minimal_bootstrap_defaults() -> None:
    boot = parse({"xds_servers": [INSECURE]})
    assert boot.node.id == "" and boot.node.metadata == {} and boot.node.locality.zone == ""
    assert boot.certificate_providers == {} and boot.authorities == {}
    assert boot.server_listener_resource_name_template is None
    assert boot.client_default_listener_resource_name_template == "%s"
    assert boot.servers[0].channel_creds.tls is None


def test_tls_creds_without_config_use_system_roots() -> None:
    """A65: tls with no files is plain server-authenticated TLS (default roots), not a downgrade to insecure."""
    boot = parse({"xds_servers": [{"server_uri": "x:443", "channel_creds": [{"type": "tls"}, {"type": "insecure"}]}]})
    assert boot.servers[0].channel_creds.type == "tls"
    assert boot.servers[0].channel_creds.tls == CertificateFiles()


def test_file_watcher_refresh_interval_default_and_floor(pki: dict[str, str]) -> None:
    def provider(config: dict[str, str]) -> CertificateFiles:
        doc = base()
        doc["certificate_providers"] = {"p": {"plugin_name": "file_watcher", "config": config}}
        return parse(doc).certificate_providers["p"].files

    assert provider({"ca_certificate_file": pki["ca"]}) == CertificateFiles(None, None, pki["ca"], 600.0)
    assert provider({"ca_certificate_file": pki["ca"], "refresh_interval": "0.25s"}).refresh_interval == 1.0
    assert provider({"ca_certificate_file": pki["ca"], "refresh_interval": "90.5s"}).refresh_interval == 90.5
    only_identity = provider({"certificate_file": pki["client_cert"], "private_key_file": pki["client_key"]})
    assert only_identity.ca_certificate_file is None


A47 = {
    "xds_servers": [{"server_uri": "xds-server.authority.com", "channel_creds": [{"type": "insecure"}]}],
    "client_default_listener_resource_name_template": (
        "xdstp://xds.authority.com/envoy.config.listener.v3.Listener/grpc/client/%s?project_id=1234"
    ),
    "server_listener_resource_name_template": (
        "xdstp://xds.authority.com/envoy.config.listener.v3.Listener/grpc/server/%s?project_id=1234"
    ),
    "authorities": {
        "xds.authority.com": {
            "client_listener_resource_name_template": (
                "xdstp://xds.authority.com/envoy.config.listener.v3.Listener/grpc/client/%s?project_id=1234"
            )
        },
        "xds.other.com": {
            "xds_servers": [{"server_uri": "xds-server.other.com", "channel_creds": [{"type": "insecure"}]}]
        },
    },
}


def test_a47_federation_example() -> None:
    """A47's worked example (its google_default creds replaced by insecure: see the next test)."""
    boot = parse(A47)
    top = boot.servers
    default = boot.listener_for("xds:server.example.com")
    assert default.resource_name == (
        "xdstp://xds.authority.com/envoy.config.listener.v3.Listener/grpc/client/server.example.com?project_id=1234"
    )
    assert (default.servers, default.authority) == (top, "xds.authority.com")
    named = boot.listener_for("xds://xds.authority.com/server.example.com")
    assert named == default
    other = boot.listener_for("xds://xds.other.com/server.other.com")
    assert other.resource_name == "xdstp://xds.other.com/envoy.config.listener.v3.Listener/server.other.com"
    assert [s.server_uri for s in other.servers] == ["xds-server.other.com"]
    assert boot.authorities["xds.other.com"].client_listener_resource_name_template == (
        "xdstp://xds.other.com/envoy.config.listener.v3.Listener/%s"
    )


def test_xdstp_names_are_percent_encoded_and_old_style_names_are_not() -> None:
    boot = parse(A47)
    assert boot.listener_for("xds:///a b/c%d").resource_name.endswith("/grpc/client/a%20b/c%25d?project_id=1234")
    plain = parse({"xds_servers": [INSECURE], "client_default_listener_resource_name_template": "lds/%s/%s"})
    assert plain.listener_for("xds:///a b").resource_name == "lds/a b/a b"
    assert plain.listener_for("xds:///a b").authority is None


@pytest.mark.parametrize(
    ("target", "expected"),
    [("http://payments", "an xds: URI"), ("xds://nowhere/payments", "an authority listed")],
)
def test_listener_for_refuses_bad_targets(target: str, expected: str) -> None:
    with pytest.raises(ConfigError, match=expected) as info:
        parse(A47).listener_for(target)
    assert target in str(info.value)


def test_google_default_first_is_refused_not_skipped() -> None:
    """A47's example lists only google_default: gRPC would use it, meshlib cannot, so it says so; it never falls
    through to a later entry (that would downgrade what gRPC would do)."""
    doc = copy.deepcopy(A47)
    doc["xds_servers"][0]["channel_creds"] = [{"type": "google_default"}, {"type": "insecure"}]
    with pytest.raises(BootstrapError) as info:
        parse(doc)
    assert info.value.path == "xds_servers[0].channel_creds[0].type"
    assert "'google_default'" in str(info.value) and "will not fall through" in str(info.value)
    # After a type meshlib supports, google_default is a later choice gRPC would not reach either.
    doc["xds_servers"][0]["channel_creds"] = [{"type": "insecure"}, {"type": "google_default"}]
    assert parse(doc).servers[0].channel_creds.type == "insecure"


# -- every error ---------------------------------------------------------------------------------------------------

Mutation = Callable[[dict[str, Any]], object]


def set_at(*keys: Any, value: object) -> Mutation:
    def mutate(doc: dict[str, Any]) -> object:
        target: Any = doc
        for key in keys[:-1]:
            target = target[key]
        target[keys[-1]] = value
        return doc

    return mutate


def drop(*keys: Any) -> Mutation:
    def mutate(doc: dict[str, Any]) -> object:
        target: Any = doc
        for key in keys[:-1]:
            target = target[key]
        del target[keys[-1]]
        return doc

    return mutate


def creds(*entries: object) -> Mutation:
    return set_at("xds_servers", 0, "channel_creds", value=list(entries))


def provider(entry: object) -> Mutation:
    return set_at("certificate_providers", value={"p": entry})


def watcher(**config: object) -> Mutation:
    return provider({"plugin_name": "file_watcher", "config": config})


MISSING = "/nonexistent/meshlib-test/ca.pem"
ERRORS: list[tuple[str, Mutation, str, str]] = [
    ("not-an-object", lambda doc: [doc], "", "a JSON object"),
    ("servers-missing", drop("xds_servers"), "xds_servers", "required"),
    ("servers-not-array", set_at("xds_servers", value={}), "xds_servers", "a JSON array"),
    ("servers-empty", set_at("xds_servers", value=[]), "xds_servers", "a non-empty array"),
    ("servers-too-many", set_at("xds_servers", value=[INSECURE] * 33), "xds_servers", "at most 32"),
    ("server-not-object", set_at("xds_servers", value=[5]), "xds_servers[0]", "a JSON object"),
    ("uri-missing", drop("xds_servers", 0, "server_uri"), "xds_servers[0].server_uri", "required"),
    ("uri-number", set_at("xds_servers", 0, "server_uri", value=5), "xds_servers[0].server_uri", "a JSON string"),
    ("uri-blank", set_at("xds_servers", 0, "server_uri", value=" "), "xds_servers[0].server_uri", "not blank"),
    ("creds-missing", drop("xds_servers", 0, "channel_creds"), "xds_servers[0].channel_creds", "required"),
    (
        "creds-not-array",
        set_at("xds_servers", 0, "channel_creds", value={"type": "insecure"}),
        "xds_servers[0].channel_creds",
        "a JSON array",
    ),
    ("creds-empty", creds(), "xds_servers[0].channel_creds", "at least one channel_creds type gRPC knows"),
    ("creds-unknown-only", creds({"type": "foo"}), "xds_servers[0].channel_creds", "at least one"),
    ("creds-entry-not-object", creds("insecure"), "xds_servers[0].channel_creds[0]", "a JSON object"),
    ("creds-type-missing", creds({"config": {}}), "xds_servers[0].channel_creds[0].type", "required"),
    ("creds-type-number", creds({"type": 1}), "xds_servers[0].channel_creds[0].type", "a JSON string"),
    (
        "creds-config-not-object",
        creds({"type": "foo"}, {"type": "insecure", "config": 5}),
        "xds_servers[0].channel_creds[1].config",
        "a JSON object",
    ),
    ("google-default-first", creds({"type": "google_default"}), "xds_servers[0].channel_creds[0].type", "meshlib"),
    (
        "tls-cert-without-key",
        creds({"type": "tls", "config": {"certificate_file": "/c.pem"}}),
        "xds_servers[0].channel_creds[0].config",
        "both set or both unset",
    ),
    (
        "tls-refresh-no-s",
        creds({"type": "tls", "config": {"refresh_interval": "1.5"}}),
        "xds_servers[0].channel_creds[0].config.refresh_interval",
        "a duration such as",
    ),
    (
        "tls-refresh-negative",
        creds({"type": "tls", "config": {"refresh_interval": "-1s"}}),
        "xds_servers[0].channel_creds[0].config.refresh_interval",
        "0 to 315576000000 seconds",
    ),
    (
        "tls-refresh-too-precise",
        creds({"type": "tls", "config": {"refresh_interval": "1.0000000001s"}}),
        "xds_servers[0].channel_creds[0].config.refresh_interval",
        "at most 9 digits",
    ),
    (
        "tls-refresh-number",
        creds({"type": "tls", "config": {"refresh_interval": 60}}),
        "xds_servers[0].channel_creds[0].config.refresh_interval",
        "a JSON string",
    ),
    (
        "tls-ca-missing-file",
        creds({"type": "tls", "config": {"ca_certificate_file": MISSING}}),
        "xds_servers[0].channel_creds[0].config.ca_certificate_file",
        "an existing file",
    ),
    (
        "tls-ca-blank",
        creds({"type": "tls", "config": {"ca_certificate_file": ""}}),
        "xds_servers[0].channel_creds[0].config.ca_certificate_file",
        "not blank",
    ),
    (
        "later-tls-invalid",
        creds({"type": "insecure"}, {"type": "tls", "config": {"private_key_file": "/k"}}),
        "xds_servers[0].channel_creds[1].config",
        "both set or both unset",
    ),
    (
        "features-not-array",
        set_at("xds_servers", 0, "server_features", value="xds_v3"),
        "xds_servers[0].server_features",
        "a JSON array",
    ),
    ("node-not-object", set_at("node", value="n1"), "node", "a JSON object"),
    ("node-id-number", set_at("node", "id", value=1), "node.id", "a JSON string"),
    ("node-cluster-bool", set_at("node", "cluster", value=True), "node.cluster", "a JSON string"),
    ("locality-not-object", set_at("node", "locality", value=[]), "node.locality", "a JSON object"),
    ("locality-zone-number", set_at("node", "locality", value={"zone": 3}), "node.locality.zone", "a JSON string"),
    ("metadata-array", set_at("node", "metadata", value=[]), "node.metadata", "a JSON object"),
    ("metadata-too-big", set_at("node", "metadata", value={"k": "x" * 70_000}), "node.metadata", "at most 65536"),
    ("providers-not-object", set_at("certificate_providers", value=[]), "certificate_providers", "a JSON object"),
    ("provider-not-object", provider("file_watcher"), 'certificate_providers["p"]', "a JSON object"),
    ("plugin-missing", provider({"config": {}}), 'certificate_providers["p"].plugin_name', "required"),
    ("plugin-unknown", provider({"plugin_name": "meshca"}), 'certificate_providers["p"].plugin_name', "file_watcher"),
    ("plugin-blank", provider({"plugin_name": ""}), 'certificate_providers["p"].plugin_name', "file_watcher"),
    (
        "provider-config-not-object",
        provider({"plugin_name": "file_watcher", "config": "x"}),
        'certificate_providers["p"].config',
        "a JSON object",
    ),
    (
        "watcher-no-files",
        watcher(refresh_interval="60s"),
        'certificate_providers["p"].config',
        'at least one of "certificate_file" and "ca_certificate_file"',
    ),
    (
        "watcher-key-without-cert",
        watcher(private_key_file="/k.pem", ca_certificate_file="/c.pem"),
        'certificate_providers["p"].config',
        "both set or both unset",
    ),
    (
        "watcher-missing-file",
        watcher(ca_certificate_file=MISSING),
        'certificate_providers["p"].config.ca_certificate_file',
        "an existing file",
    ),
    (
        "watcher-refresh-bad",
        watcher(ca_certificate_file=MISSING, refresh_interval="1m"),
        'certificate_providers["p"].config.refresh_interval',
        "a duration such as",
    ),
    ("authorities-not-object", set_at("authorities", value=[]), "authorities", "a JSON object"),
    ("authority-not-object", set_at("authorities", value={"a": 1}), 'authorities["a"]', "a JSON object"),
    (
        "authority-template-prefix",
        set_at("authorities", value={"a": {"client_listener_resource_name_template": "xdstp://b/x/%s"}}),
        'authorities["a"].client_listener_resource_name_template',
        'a name starting "xdstp://a/"',
    ),
    (
        "authority-server-invalid",
        set_at("authorities", value={"a": {"xds_servers": [{"server_uri": "x"}]}}),
        'authorities["a"].xds_servers[0].channel_creds',
        "required",
    ),
    (
        "authority-fallback-not-bool",
        set_at("authorities", value={"a": {"fallback_on_reachability_only": "yes"}}),
        'authorities["a"].fallback_on_reachability_only',
        "true or false",
    ),
    (
        "default-template-unknown-authority",
        set_at("client_default_listener_resource_name_template", value="xdstp://nope/%s"),
        "client_default_listener_resource_name_template",
        "authority ('nope') is listed",
    ),
    (
        "default-template-number",
        set_at("client_default_listener_resource_name_template", value=1),
        "client_default_listener_resource_name_template",
        "a JSON string",
    ),
    (
        "server-template-number",
        set_at("server_listener_resource_name_template", value=[]),
        "server_listener_resource_name_template",
        "a JSON string",
    ),
]


@pytest.mark.parametrize(("mutate", "path", "expected"), [case[1:] for case in ERRORS], ids=[c[0] for c in ERRORS])
def test_every_error_names_source_path_value_and_expectation(mutate: Mutation, path: str, expected: str) -> None:
    source = "GRPC_XDS_BOOTSTRAP=/etc/mesh/bootstrap.json"
    with pytest.raises(BootstrapError) as info:
        parse(mutate(base()), source=source)
    error = info.value
    assert isinstance(error, ConfigError)
    assert (error.source, error.path) == (source, path)
    assert expected in error.expected
    message = str(error)
    assert message.startswith(f"{source}: {path}=" if path else f"{source}=")
    assert len(repr(error.value)) <= 103  # shown truncated


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", "a JSON object"),
        ("{", "a JSON object"),
        ('{"xds_servers": [], "xds_servers": []}', "without duplicate keys"),
        ('{"xds_servers": NaN}', "no NaN"),
        ("[" * 70 + "]" * 70, "nesting at most 64"),
        ("[" * 5000 + "]" * 5000, "nesting at most 64"),
        (json.dumps({"node": {"metadata": {"k": [0] * 100_001}}}), "at most 100000 JSON values"),
        (b'{"xds_servers": "\xff"}', "UTF-8"),
        (" " * (MAX_BOOTSTRAP_BYTES + 1), "at most 1 MiB"),
    ],
    ids=["empty", "truncated", "duplicate-key", "nan", "deep", "very-deep", "too-many-values", "not-utf8", "big"],
)
def test_bad_json_is_refused(text: str | bytes, expected: str) -> None:
    with pytest.raises(BootstrapError, match=expected) as info:
        parse_bootstrap(text, source="GRPC_XDS_BOOTSTRAP_CONFIG")
    assert str(info.value).startswith("GRPC_XDS_BOOTSTRAP_CONFIG")


def test_control_characters_in_values_are_escaped() -> None:
    doc = base()
    doc["certificate_providers"] = {"p": {"plugin_name": "\x1b[31m\n"}}
    with pytest.raises(BootstrapError) as info:
        parse(doc)
    assert "\\x1b[31m\\n" in str(info.value) and "\x1b" not in str(info.value) and "\n" not in str(info.value)


def test_unknown_fields_ignored_call_creds_warned(caplog: pytest.LogCaptureFixture) -> None:
    doc = base()
    doc["xds_servers"][0]["call_creds"] = [{"type": "jwt_token_file", "config": {"jwt_token_file": "/t"}}]
    doc["xds_servers"][0]["future"] = 1
    doc["node"]["future"] = {"x": 1}
    doc["allowed_grpc_services"] = {"dns:///x": {}}
    with caplog.at_level("WARNING", logger="meshlib.control.xds"):
        boot = parse(doc)
    assert boot.servers[0].server_uri == "127.0.0.1:1"
    assert "xds_servers[0].call_creds is ignored" in caplog.text and "allowed_grpc_services is ignored" in caplog.text


# -- where the bootstrap comes from --------------------------------------------------------------------------------


@pytest.fixture
def bootstrap_file(tmp_path: Path) -> Path:
    path = tmp_path / "bootstrap.json"
    doc = base()
    doc["node"]["id"] = "from-file"
    path.write_text(json.dumps(doc))
    return path


def inline(node_id: str) -> str:
    doc = base()
    doc["node"]["id"] = node_id
    return json.dumps(doc)


def test_neither_variable_means_no_xds() -> None:
    assert from_env({}) is None
    assert from_env({"UNRELATED": "1"}) is None


def test_file_variable(bootstrap_file: Path) -> None:
    boot = from_env({"GRPC_XDS_BOOTSTRAP": str(bootstrap_file)})
    assert boot is not None and boot.node.id == "from-file"
    assert boot.source == f"GRPC_XDS_BOOTSTRAP={bootstrap_file}"


def test_inline_variable() -> None:
    boot = from_env({"GRPC_XDS_BOOTSTRAP_CONFIG": inline("inline")})
    assert boot is not None and boot.node.id == "inline" and boot.source == "GRPC_XDS_BOOTSTRAP_CONFIG"


def test_file_wins_over_inline_as_in_grpc(bootstrap_file: Path) -> None:
    environ = {"GRPC_XDS_BOOTSTRAP": str(bootstrap_file), "GRPC_XDS_BOOTSTRAP_CONFIG": inline("inline")}
    boot = from_env(environ)
    assert boot is not None and boot.node.id == "from-file"
    # The file is used even when the inline one is invalid (it is not read at all).
    environ["GRPC_XDS_BOOTSTRAP_CONFIG"] = "{not json"
    assert from_env(environ) is not None


def test_from_env_reads_os_environ_by_default(bootstrap_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GRPC_XDS_BOOTSTRAP_CONFIG", raising=False)
    monkeypatch.setenv("GRPC_XDS_BOOTSTRAP", str(bootstrap_file))
    boot = from_env()
    assert boot is not None and boot.node.id == "from-file"


@pytest.mark.parametrize(
    ("environ", "source", "expected"),
    [
        ({"GRPC_XDS_BOOTSTRAP": " ", "GRPC_XDS_BOOTSTRAP_CONFIG": "{}"}, "GRPC_XDS_BOOTSTRAP", "the path of"),
        ({"GRPC_XDS_BOOTSTRAP": "/nonexistent/b.json"}, "GRPC_XDS_BOOTSTRAP=/nonexistent/b.json", "a readable"),
        ({"GRPC_XDS_BOOTSTRAP_CONFIG": ""}, "GRPC_XDS_BOOTSTRAP_CONFIG", "a JSON object"),
        ({"GRPC_XDS_BOOTSTRAP_CONFIG": '{"xds_servers": []}'}, "GRPC_XDS_BOOTSTRAP_CONFIG", "non-empty"),
    ],
    ids=["blank-path-does-not-fall-back", "missing-file", "blank-inline", "invalid-inline"],
)
def test_variable_errors(environ: dict[str, str], source: str, expected: str) -> None:
    with pytest.raises(BootstrapError, match=expected) as info:
        from_env(environ)
    assert info.value.source == source


def test_file_errors_name_the_file(tmp_path: Path) -> None:
    path = tmp_path / "b.json"
    path.write_bytes(b" " * (MAX_BOOTSTRAP_BYTES + 10))
    with pytest.raises(BootstrapError, match="at most 1 MiB") as info:
        from_env({"GRPC_XDS_BOOTSTRAP": str(path)})
    assert str(path) in str(info.value)
    path.write_text('{"xds_servers": [{"server_uri": "x", "channel_creds": [{"type": "nope"}]}]}')
    with pytest.raises(BootstrapError) as info:
        from_env({"GRPC_XDS_BOOTSTRAP": str(path)})
    assert str(info.value).startswith(f"GRPC_XDS_BOOTSTRAP={path}: xds_servers[0].channel_creds=['nope']")


# -- channels to real management-server stand-ins ------------------------------------------------------------------


@pytest.fixture(scope="module")
def grpc_servers(pki: dict[str, str]) -> Iterator[dict[str, int]]:
    """Real grpcio servers on loopback answering /test.Echo/Echo with the request's bytes reversed: plaintext, and
    TLS requiring a client certificate."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    echo = grpc.unary_unary_rpc_method_handler(lambda request, context: request[::-1])
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("test.Echo", {"Echo": echo})])
    plain = server.add_insecure_port("127.0.0.1:0")
    read = {name: Path(path).read_bytes() for name, path in pki.items()}
    mtls = server.add_secure_port(
        "127.0.0.1:0",
        grpc.ssl_server_credentials(
            [(read["server_key"], read["server_cert"])], root_certificates=read["ca"], require_client_auth=True
        ),
    )
    server.start()
    yield {"plain": plain, "mtls": mtls}
    server.stop(grace=None)


def check(server: XdsServer) -> bytes:
    with channel_for(server) as channel:
        answer: bytes = channel.unary_unary("/test.Echo/Echo")(b"ping", timeout=20)
        return answer


def server_for(uri: str, creds: list[dict[str, Any]]) -> XdsServer:
    return parse({"xds_servers": [{"server_uri": uri, "channel_creds": creds}]}).servers[0]


def test_channel_for_insecure(grpc_servers: dict[str, int]) -> None:
    server = server_for(f"127.0.0.1:{grpc_servers['plain']}", [{"type": "insecure"}])
    assert check(server) == b"gnip"


def test_channel_for_mutual_tls(grpc_servers: dict[str, int], pki: dict[str, str]) -> None:
    config = {
        "ca_certificate_file": pki["ca"],
        "certificate_file": pki["client_cert"],
        "private_key_file": pki["client_key"],
    }
    server = server_for(f"127.0.0.1:{grpc_servers['mtls']}", [{"type": "tls", "config": config}])
    assert check(server) == b"gnip"


@pytest.mark.parametrize(
    "config",
    [
        {"ca_certificate_file": "other_ca", "certificate_file": "client_cert", "private_key_file": "client_key"},
        {"ca_certificate_file": "ca"},
    ],
    ids=["server-not-trusted", "no-client-certificate"],
)
def test_channel_for_tls_never_fails_open(
    grpc_servers: dict[str, int], pki: dict[str, str], config: dict[str, str]
) -> None:
    """A server the CA file does not vouch for is refused; a TLS channel without the client certificate the server
    demands fails: the channel uses exactly the files the bootstrap named."""
    server = server_for(
        f"127.0.0.1:{grpc_servers['mtls']}", [{"type": "tls", "config": {k: pki[v] for k, v in config.items()}}]
    )
    with pytest.raises(grpc.RpcError) as info:
        check(server)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE


def test_channel_for_tls_to_plaintext_server_fails(grpc_servers: dict[str, int], pki: dict[str, str]) -> None:
    server = server_for(
        f"127.0.0.1:{grpc_servers['plain']}", [{"type": "tls", "config": {"ca_certificate_file": pki["ca"]}}]
    )
    with pytest.raises(grpc.RpcError):
        check(server)


def test_channel_for_names_a_file_gone_since_load(tmp_path: Path, pki: dict[str, str]) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_bytes(Path(pki["ca"]).read_bytes())
    server = server_for("127.0.0.1:1", [{"type": "tls", "config": {"ca_certificate_file": str(ca)}}])
    ca.unlink()
    with pytest.raises(BootstrapError, match="a readable file") as info:
        channel_for(server)
    assert info.value.path == "channel_creds.config.ca_certificate_file"


# -- differential: grpcio's C-core reads the same bootstraps -------------------------------------------------------

PROBE = textwrap.dedent(
    """
    import json, sys
    import grpc
    # Each bootstrap goes to C-core's own parser (GrpcXdsBootstrap::Create) through its test-only channel argument:
    # changing GRPC_XDS_BOOTSTRAP_CONFIG between channels would race C-core's threads reading the environment
    # (setenv is not thread-safe; it crashed grpcio here). null: the bootstrap comes from the environment.
    for index, text in enumerate(json.load(sys.stdin)):
        options = [] if text is None else [("grpc.TEST_ONLY_DO_NOT_USE_IN_PROD.xds_bootstrap_config", text)]
        channel = grpc.insecure_channel(f"xds:///probe{index}", options=options)
        try:
            channel.unary_unary("/probe/Probe")(b"", timeout=10)
            details = "OK"
        except grpc.RpcError as error:
            details = error.details() or ""
        channel.close()
        print(json.dumps("Failed to create XdsClient" in details), flush=True)
    """
)


def core_refuses(cases: list[str | None], environ: dict[str, str] | None = None) -> list[bool]:
    """For each bootstrap, whether grpcio's C-core refuses it (one subprocess for them all)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GRPC_")}
    env.update(environ or {}, GRPC_VERBOSITY="NONE")
    result = subprocess.run(
        [sys.executable, "-c", PROBE],
        input=json.dumps(cases),
        check=False,
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    verdicts = [bool(json.loads(line)) for line in result.stdout.split()]
    assert len(verdicts) == len(cases), (result.returncode, result.stderr[-3000:])
    return verdicts


def test_core_refuses_what_meshlib_refuses_and_accepts_what_it_accepts() -> None:
    """C-core (grpcio) creating an xds:/// channel from the same bootstrap: an invalid one fails the channel with
    "Failed to create XdsClient"; a valid one gets as far as the (unreachable) server. The cases where meshlib is
    stricter (C_CORE_ACCEPTS, but NOT_PROBED) are confirmed accepted by C-core, so that list is exact."""
    refused = [json.dumps(mutate(base())) for name, mutate, _, _ in ERRORS if name not in C_CORE_ACCEPTS]
    refused += ['{"xds_servers": [], "xds_servers": []}', '{"xds_servers": NaN}', "", "[" * 70 + "]" * 70]
    valid = [base(), A47, {"xds_servers": [INSECURE], "unknown": {"x": [1]}}]
    stricter = [mutate(base()) for name, mutate, _, _ in ERRORS if name in C_CORE_ACCEPTS - NOT_PROBED]
    for text in refused:
        with pytest.raises(BootstrapError):
            parse_bootstrap(text, source="GRPC_XDS_BOOTSTRAP_CONFIG")
    for doc in valid:
        parse(doc)
    accepted = [json.dumps(doc) for doc in valid + stricter]
    # The refused ones in one process; each accepted one in its own: grpcio 1.85.3 crashed (SIGSEGV) here when one
    # process created many xds: channels whose bootstraps were accepted (an XdsClient each) after others.
    core_refused = core_refuses(refused)
    with futures.ThreadPoolExecutor(max_workers=4) as pool:
        core_accepted = [verdicts[0] for verdicts in pool.map(lambda text: core_refuses([text]), accepted)]
    disagreements = [text for text, no in zip(refused, core_refused, strict=True) if not no]
    disagreements += [text for text, no in zip(accepted, core_accepted, strict=True) if no]
    assert disagreements == []


def test_core_reads_the_variables_with_the_same_precedence(bootstrap_file: Path) -> None:
    """GRPC_XDS_BOOTSTRAP wins over an invalid GRPC_XDS_BOOTSTRAP_CONFIG; a blank GRPC_XDS_BOOTSTRAP is refused
    rather than falling back; both in C-core as in meshlib."""
    both = {"GRPC_XDS_BOOTSTRAP": str(bootstrap_file), "GRPC_XDS_BOOTSTRAP_CONFIG": "{not json"}
    blank = {"GRPC_XDS_BOOTSTRAP": " ", "GRPC_XDS_BOOTSTRAP_CONFIG": inline("inline")}
    assert from_env(both) is not None
    with pytest.raises(BootstrapError):
        from_env(blank)
    assert core_refuses([None], both) == [False]
    assert core_refuses([None], blank) == [True]


#: Where meshlib is stricter than C-core at parse time (docs/xds.md says why): C-core accepts these and
#: fails later (a lame channel, a failed handshake, an unparseable resource name) or never notices.
C_CORE_ACCEPTS = {
    "servers-too-many",  # meshlib's bound
    "uri-blank",  # C-core: a lame channel to ""
    "google-default-first",  # C-core supports google_default
    "tls-ca-missing-file",  # C-core: fails at the handshake
    "tls-ca-blank",
    "metadata-too-big",  # meshlib's bound
    "plugin-blank",  # C-core skips the plugin lookup for an empty name
    "watcher-missing-file",  # C-core: fails when the provider is used
    "default-template-unknown-authority",  # C-core: fails when the channel is created
}


#: Not given to C-core: it would probe for GCE credentials (google_default), or it crashed (SIGSEGV, intermittently,
#: grpcio 1.85.3) on 33 copies of one server: meshlib's bound of 32 servers refuses that bootstrap.
NOT_PROBED = {"google-default-first", "servers-too-many"}


def test_stricter_than_core_list_is_exact() -> None:
    assert {name for name, *_ in ERRORS} >= C_CORE_ACCEPTS

"""Talking to the local Consul agent: where it is, how to authenticate, and the HTTP clients that reach it.

Everything that depends on *which* agent and *whose* credentials lives here, so the rest of the package
(the query rules, the answer parsing) never sees an address, a certificate or a token.

The agent and credentials come from the Consul tools' own variables, read when the resolver is built
(from ``DiscoverySettings.environ`` when the client was given an environment, else ``os.environ``):

``CONSUL_HTTP_ADDR``  ``host:port``, ``http://host[:port][/prefix]``, ``https://...`` or ``unix:///path``
(default ``127.0.0.1:8500``); ``CONSUL_HTTP_SSL=true`` makes ``host:port`` (and ``http://``) use https.
``CONSUL_HTTP_TOKEN`` / ``CONSUL_HTTP_TOKEN_FILE`` (the file wins, as in Consul's API client): sent as the
``X-Consul-Token`` header, never in a URL, a log line, an error or a repr. ``CONSUL_HTTP_AUTH``
(``user:password``, HTTP basic auth). ``CONSUL_CACERT``, ``CONSUL_CAPATH``, ``CONSUL_CLIENT_CERT`` and
``CONSUL_CLIENT_KEY`` (both or neither), ``CONSUL_TLS_SERVER_NAME`` (SNI and certificate name),
``CONSUL_HTTP_SSL_VERIFY=false`` (logs a warning). ``CONSUL_NAMESPACE`` / ``CONSUL_PARTITION`` (Enterprise)
become ``ns`` / ``partition`` unless the URI sets them. A bad value raises :class:`~meshlib.ConfigError`
naming the variable (where Consul's Go client would log and carry on, e.g. ``CONSUL_HTTP_SSL_VERIFY=maybe``
would silently disable verification there).

:class:`ConsulAgent` is those settings, validated. :class:`AgentClient` sends a :class:`Request` to the
agent and hands back a :class:`Reply` (a response or a transport error, never an exception for either), with
an ``httpx.Client`` for blocking callers and an ``httpx.AsyncClient`` for the event loop. Its
:meth:`~AgentClient.close` may be called from any thread and ends a request in flight at once: it shuts down
the request's socket (closing a socket does not wake a thread blocked reading it; shutting it down does).
Connections are not kept alive between requests (one every few minutes at most, or one per 15 s under
churn), so nothing is left to close asynchronously.

:func:`acl_error` turns Consul refusing the token (403, or every instance filtered out by ACLs) into a
:class:`~meshlib.errors.ConsulACLError` that names where the token came from, never its value; every message
built from the agent's answers goes through :func:`_redact` with :meth:`ConsulAgent.secrets`.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import re
import socket
import ssl
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, quote_plus

import httpx

from meshlib._config.parse import REDACTED, ascii_digits, control_character, redact_uri
from meshlib.errors import ConfigError, ConsulACLError

__all__ = [
    "DEFAULT_ADDR",
    "AgentClient",
    "ConsulAgent",
    "Reply",
    "Request",
    "acl_error",
]

logger = logging.getLogger("meshlib.discovery")

#: Consul's default agent address (``api.DefaultConfig``).
DEFAULT_ADDR = "127.0.0.1:8500"

#: httpcore trace events whose return value is a freshly connected (or TLS-wrapped) network stream.
_CONNECTED = frozenset(
    {
        "connection.connect_tcp.complete",
        "connection.connect_unix_socket.complete",
        "connection.start_tls.complete",
    }
)


# --- the agent (CONSUL_* variables) --------------------------------------------------------------------------

_GO_TRUE = frozenset({"1", "t", "true"})
_GO_FALSE = frozenset({"0", "f", "false"})
_HOST = re.compile(r"[A-Za-z0-9_.-]+")


def _go_bool(variable: str, raw: str) -> bool:
    """A boolean as Go's ``strconv.ParseBool`` reads it (what Consul's tools use), else a ConfigError."""
    value = raw.strip().lower()
    if value in _GO_TRUE:
        return True
    if value in _GO_FALSE:
        return False
    raise ConfigError(variable, raw, "a boolean: true or false (also 1/0, t/f)")


def _split_host_port(variable: str, raw: str, text: str, default_port: int | None) -> tuple[str, int]:
    expected = _ADDR_EXPECTED
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ConfigError(variable, raw, expected)
        host, rest = text[1:end], text[end + 1 :]
        if not host or ":" not in host:
            raise ConfigError(variable, raw, expected)
    else:
        host, sep, port_text = text.partition(":")
        rest = f":{port_text}" if sep else ""
        if not host or not _HOST.fullmatch(host):
            raise ConfigError(variable, raw, expected)
    if not rest:
        if default_port is None:
            raise ConfigError(variable, raw, f"{expected} (host:port needs the port)")
        return host, default_port
    port_text = rest[1:] if rest.startswith(":") else ""
    if not ascii_digits(port_text, 5) or not 1 <= int(port_text) <= 65535:
        raise ConfigError(variable, raw, f"{expected} (port from 1 to 65535)")
    return host, int(port_text)


_ADDR_EXPECTED = "the Consul HTTP API address: host:port, http://host[:port][/prefix], https://... or unix:///path"


@dataclass(frozen=True, slots=True)
class ConsulAgent:
    """Where and how to reach the Consul HTTP API, from the ``CONSUL_*`` variables (validated).

    ``base_url`` is what httpx talks to (``http://localhost`` for a unix socket, then ``uds`` is the path);
    ``address`` is the printable form used in errors. Secrets (token, basic auth) are excluded from the
    repr and from every message.
    """

    base_url: str
    address: str
    uds: str | None = None
    tls: ssl.SSLContext | None = field(default=None, repr=False, compare=False)
    server_name: str | None = None
    namespace: str | None = None
    partition: str | None = None
    token: str | None = field(default=None, repr=False)
    token_origin: str = ""
    auth: tuple[str, str] | None = field(default=None, repr=False)

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> ConsulAgent:
        """Read ``CONSUL_HTTP_ADDR`` and the other variables the Consul CLI and API client honour."""

        def get(name: str) -> str | None:
            value = environ.get(name)
            return value.strip() if value is not None and value.strip() else None

        ssl_flag = False
        if (raw_ssl := get("CONSUL_HTTP_SSL")) is not None:
            ssl_flag = _go_bool("CONSUL_HTTP_SSL", raw_ssl)
        verify = True
        if (raw_verify := get("CONSUL_HTTP_SSL_VERIFY")) is not None:
            verify = _go_bool("CONSUL_HTTP_SSL_VERIFY", raw_verify)

        raw = get("CONSUL_HTTP_ADDR") or DEFAULT_ADDR
        variable = "CONSUL_HTTP_ADDR"
        if "@" in raw.partition("?")[0] and not raw.lower().startswith(
            "unix://"
        ):  # user:password@host: a secret in the address, never printed
            raise ConfigError(
                variable,
                redact_uri(raw),
                f"{_ADDR_EXPECTED}, without credentials: set CONSUL_HTTP_AUTH=user:password or CONSUL_HTTP_TOKEN",
            )
        uds: str | None = None
        prefix = ""
        if raw.lower().startswith("unix://"):
            uds = raw[len("unix://") :]
            if not uds:
                raise ConfigError(variable, raw, f"{_ADDR_EXPECTED} (unix:// needs a socket path)")
            scheme, host, port = "http", "localhost", 80
        elif "://" in raw:
            scheme, rest = raw.split("://", 1)
            scheme = scheme.lower()
            if scheme not in ("http", "https"):
                raise ConfigError(variable, raw, f"{_ADDR_EXPECTED} (unknown scheme {scheme!r})")
            if ssl_flag:
                scheme = "https"  # as Consul's client: never back to http when TLS was asked for
            hostport, _, path = rest.partition("/")
            if path.strip("/"):
                prefix = "/" + path.strip("/")
            host, port = _split_host_port(variable, raw, hostport, 443 if scheme == "https" else 80)
        else:
            if "/" in raw:
                raise ConfigError(variable, raw, _ADDR_EXPECTED)
            scheme = "https" if ssl_flag else "http"
            host, port = _split_host_port(variable, raw, raw, None)

        tls: ssl.SSLContext | None = None
        server_name: str | None = None
        if scheme == "https":
            tls = _tls_context(get, verify)
            if (name := get("CONSUL_TLS_SERVER_NAME")) is not None:
                server_name = name.rsplit(":", 1)[0] if name.count(":") == 1 else name.strip("[]")
        url_host = f"[{host}]" if ":" in host else host
        base_url = f"{scheme}://{url_host}:{port}{prefix}"
        address = f"unix://{uds}" if uds is not None else base_url

        token: str | None = None
        origin = ""
        if (token_file := get("CONSUL_HTTP_TOKEN_FILE")) is not None:
            try:
                with open(token_file, encoding="utf-8") as handle:
                    token = handle.read().strip() or None
            except OSError as exc:
                raise ConfigError(
                    "CONSUL_HTTP_TOKEN_FILE", token_file, f"a readable file holding a Consul ACL token ({exc.strerror})"
                ) from None
            origin = "CONSUL_HTTP_TOKEN_FILE" if token else ""
        if token is None and (raw_token := get("CONSUL_HTTP_TOKEN")) is not None:
            token, origin = raw_token, "CONSUL_HTTP_TOKEN"
        if token is not None and (found := control_character(token)) is not None:
            # Sent as a header: a CR/LF would split it (or make httpx refuse it, echoing it in the error).
            shown = token_file if origin == "CONSUL_HTTP_TOKEN_FILE" else REDACTED
            raise ConfigError(origin, shown, f"a Consul ACL token with no control characters (found {found})")
        auth: tuple[str, str] | None = None
        if (raw_auth := environ.get("CONSUL_HTTP_AUTH")) is not None and raw_auth:
            user, _, password = raw_auth.partition(":")
            if (found := control_character(raw_auth)) is not None:
                raise ConfigError(
                    "CONSUL_HTTP_AUTH", REDACTED, f"user:password with no control characters (found {found})"
                )
            auth = (user, password)
        return cls(
            base_url=base_url,
            address=address,
            uds=uds,
            tls=tls,
            server_name=server_name,
            namespace=get("CONSUL_NAMESPACE"),
            partition=get("CONSUL_PARTITION"),
            token=token,
            token_origin=origin,
            auth=auth,
        )

    def secrets(self) -> tuple[str, ...]:
        """The values that must never appear in a message (for :func:`_redact`), in every form an agent or a
        proxy in front of it may echo them: as given, percent-encoded, JSON-escaped, and the base64 of
        ``user:password`` that the ``Authorization: Basic`` header carries. Longest first, so a secret that
        contains another is replaced whole."""
        raw: list[str] = [self.token] if self.token else []
        found: set[str] = set()
        if self.auth is not None:
            user, password = self.auth
            if password:
                raw.append(password)
            pair = f"{user}:{password}".encode()
            for encode in (base64.b64encode, base64.urlsafe_b64encode):
                encoded = encode(pair).decode("ascii")
                found.update({encoded, encoded.rstrip("=")})
        for secret in raw:
            found.update({secret, quote(secret, safe=""), quote_plus(secret, safe=""), json.dumps(secret)[1:-1]})
        return tuple(sorted((s for s in found if s), key=len, reverse=True))


def _tls_context(get: Callable[[str], str | None], verify: bool) -> ssl.SSLContext:
    """An SSL context from ``CONSUL_CACERT``/``CONSUL_CAPATH``/``CONSUL_CLIENT_CERT``/``CONSUL_CLIENT_KEY``."""
    cafile, capath = get("CONSUL_CACERT"), get("CONSUL_CAPATH")
    try:
        context = ssl.create_default_context(cafile=cafile, capath=capath)
    except (OSError, ssl.SSLError) as exc:
        variable, value = ("CONSUL_CACERT", cafile) if cafile else ("CONSUL_CAPATH", capath)
        raise ConfigError(variable, value, f"readable PEM CA certificates ({exc})") from None
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    cert, key = get("CONSUL_CLIENT_CERT"), get("CONSUL_CLIENT_KEY")
    if (cert is None) != (key is None):
        missing, present, value = (
            ("CONSUL_CLIENT_KEY", "CONSUL_CLIENT_CERT", cert)
            if key is None
            else ("CONSUL_CLIENT_CERT", "CONSUL_CLIENT_KEY", key)
        )
        raise ConfigError(present, value, f"to be set together with {missing} (both client cert and key, or neither)")
    if cert is not None and key is not None:
        try:
            context.load_cert_chain(cert, key)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(
                "CONSUL_CLIENT_CERT", cert, f"a readable PEM certificate matching CONSUL_CLIENT_KEY ({exc})"
            ) from None
    if not verify:
        logger.warning(
            "CONSUL_HTTP_SSL_VERIFY=false: the Consul agent's TLS certificate is NOT verified; "
            "anyone on the path can impersonate it and redirect traffic"
        )
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


#: Credentials an agent (or a proxy in front of it) may echo whatever they are: the value of an
#: ``Authorization``/``Proxy-Authorization``/``X-Consul-Token`` header (``Name: value``, ``"name": "value"``,
#: ``name=value``), a ``Basic``/``Bearer`` credential, and a ``token=`` query parameter.
_CREDENTIALS = (
    re.compile(
        r"""(?i)\b((?:proxy-)?authorization|x-consul-token)(["']?\s*[:=]\s*["']?)([^"'\r\n,;}&]+)""",
    ),
    re.compile(r"(?i)\b(basic|bearer)(\s+)([A-Za-z0-9._~+/=-]{8,})"),
    re.compile(r"(?i)\b([\w-]*token)(=)([^&\s\"',;}]+)"),
)


def _redact(text: str, secrets: Iterable[str]) -> str:
    """``text`` without ``secrets`` (see :meth:`ConsulAgent.secrets`) nor credential-looking values."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, REDACTED)
    for pattern in _CREDENTIALS:
        text = pattern.sub(
            lambda m: f"{m.group(1)}{m.group(2)}{REDACTED}" if m.group(3) != REDACTED else m.group(0), text
        )
    return text


def acl_error(
    agent: ConsulAgent, consul_service: str, *, service: str, source: str, body: str = "", filtered: bool = False
) -> ConsulACLError:
    """The error for Consul refusing ``agent``'s token on a query for ``consul_service``.

    ``body`` is the 403 answer's text; ``filtered`` means a 200 whose every instance was filtered out by ACLs
    (``X-Consul-Results-Filtered-By-ACLs``). The message names the variable the token came from (or says the
    agent's default token was used) and never the token itself.
    """
    which = f"the ACL token from {agent.token_origin}" if agent.token else "the agent's default ACL token"
    hint = (
        "check CONSUL_HTTP_TOKEN / CONSUL_HTTP_TOKEN_FILE"
        if agent.token
        else "no CONSUL_HTTP_TOKEN is set, so the agent's default token was used"
    )
    if filtered:
        message = (
            f"Consul filtered every instance of service {consul_service!r} out of the answer: "
            f"{which} lacks node:read/service:read on it (X-Consul-Results-Filtered-By-ACLs); {hint}"
        )
    elif body.startswith("ACL not found"):
        message = (
            f"Consul rejected {which} (403 ACL not found: the token does not exist or has expired) "
            f"querying service {consul_service!r}; {hint}"
        )
    else:
        message = f"Consul refused {which} (403 {body or 'Forbidden'}) for service {consul_service!r}; {hint}"
    return ConsulACLError(_redact(message, agent.secrets()), service=service, source=source)


# --- the HTTP clients ----------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Request:
    """Step: send ``GET path?params``; ``blocking`` when it carries ``index``."""

    path: str
    params: tuple[tuple[str, str], ...]
    timeout: httpx.Timeout
    blocking: bool


@dataclass(frozen=True, slots=True)
class Reply:
    """What a request gave: a response (status, lower-case headers, body) or a transport error."""

    status: int = 0
    headers: Mapping[str, str] = field(default_factory=dict)
    body: bytes = b""
    error: Exception | None = None


class _Closed(Exception):
    """The client was closed before or while a request was in progress."""


class AgentClient:
    """The HTTP clients to one Consul agent, with its address, TLS, basic auth and ACL token.

    Owns an ``httpx.Client`` (for :meth:`send`) and an ``httpx.AsyncClient`` (for :meth:`asend`), each created
    on first use. ``closed`` is the owner's "closed" flag, shared so that the owner's own waits end on it too;
    :meth:`close` sets it. One request at a time (the owner's); :meth:`close` from any thread. A request
    started, or interrupted, after :meth:`close` raises :class:`_Closed`.
    """

    def __init__(self, agent: ConsulAgent, closed: threading.Event) -> None:
        self.agent = agent
        self._lock = threading.Lock()
        self._closed = closed
        self._sockets: set[Any] = set()
        self._sync_client: httpx.Client | None = None
        self._async_client: httpx.AsyncClient | None = None
        headers = {"Accept": "application/json"}
        if agent.token:
            headers["X-Consul-Token"] = agent.token
        self._headers = headers
        self._extensions: dict[str, Any] = {}
        if agent.server_name:
            self._extensions["sni_hostname"] = agent.server_name

    def close(self) -> None:
        """Interrupt a request in flight (from any thread), close the HTTP clients. Idempotent."""
        self._closed.set()
        with self._lock:
            sockets, self._sockets = list(self._sockets), set()
            client, self._sync_client = self._sync_client, None
            # Never keeps a connection between queries, and a query in flight ends with its socket below:
            # nothing is left that would need an ``await aclose()``.
            self._async_client = None
        for sock in sockets:
            _shutdown(sock)
        if client is not None:
            client.close()

    def _client_options(self) -> dict[str, Any]:
        """What both HTTP clients to the agent share: its address, TLS, auth, no keep-alive, no proxies."""
        # A plain http:// agent still needs some context for httpx; the default one loads the CA bundle (tens of
        # ms of CPU for every watch loop's client). This one loads nothing and is never used: an https:// URL it
        # did meet would fail verification (no trusted CA), never pass unverified.
        return {
            "verify": self.agent.tls if self.agent.tls is not None else ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT),
            "uds": self.agent.uds,
            "limits": httpx.Limits(max_keepalive_connections=0),
        }

    def _client(self) -> httpx.Client:
        with self._lock:
            if self._closed.is_set():
                raise _Closed
            if self._sync_client is None:
                self._sync_client = httpx.Client(
                    base_url=self.agent.base_url,
                    transport=httpx.HTTPTransport(**self._client_options()),
                    auth=self.agent.auth,
                    trust_env=False,
                )
            return self._sync_client

    def _aclient(self) -> httpx.AsyncClient:
        with self._lock:
            if self._closed.is_set():
                raise _Closed
            if self._async_client is None:
                self._async_client = httpx.AsyncClient(
                    base_url=self.agent.base_url,
                    transport=httpx.AsyncHTTPTransport(**self._client_options()),
                    auth=self.agent.auth,
                    trust_env=False,
                )
            return self._async_client

    def _track(self, stream: Any, mine: list[Any]) -> None:
        """Remember a query's socket so :meth:`close` can shut it down (and do it now if already closed)."""
        sock = stream.get_extra_info("socket") if hasattr(stream, "get_extra_info") else None
        if sock is None:
            return
        with self._lock:
            closed = self._closed.is_set()
            if not closed:
                self._sockets.add(sock)
                mine.append(sock)
        if closed:
            _shutdown(sock)

    def _untrack(self, mine: list[Any]) -> None:
        with self._lock:
            self._sockets.difference_update(mine)

    def send(self, request: Request) -> Reply:
        """Send ``request`` and read the whole answer; a transport error is returned in the :class:`Reply`."""
        client = self._client()
        mine: list[Any] = []

        def trace(event: str, info: Mapping[str, Any]) -> None:
            if event in _CONNECTED:
                self._track(info.get("return_value"), mine)

        try:
            response = client.get(
                request.path,
                params=request.params,
                headers=self._headers,
                timeout=request.timeout,
                extensions={**self._extensions, "trace": trace},
            )
        except Exception as exc:  # httpx errors, and whatever a pool closed under our feet raises
            if self._closed.is_set():
                raise _Closed from None
            if not isinstance(exc, httpx.HTTPError):
                raise
            return Reply(error=exc)
        finally:
            self._untrack(mine)
        return Reply(response.status_code, _lower(response.headers), response.content)

    async def asend(self, request: Request) -> Reply:
        """Same as :meth:`send` on the event loop; cancelling the task ends the request at once."""
        client = self._aclient()
        mine: list[Any] = []

        async def trace(event: str, info: Mapping[str, Any]) -> None:
            if event in _CONNECTED:
                self._track(info.get("return_value"), mine)

        try:
            response = await client.get(
                request.path,
                params=request.params,
                headers=self._headers,
                timeout=request.timeout,
                extensions={**self._extensions, "trace": trace},
            )
        except Exception as exc:
            if self._closed.is_set():
                raise _Closed from None
            if not isinstance(exc, httpx.HTTPError):
                raise
            return Reply(error=exc)
        finally:
            self._untrack(mine)
        return Reply(response.status_code, _lower(response.headers), response.content)


def _lower(headers: httpx.Headers) -> dict[str, str]:
    return {key.lower(): value for key, value in headers.items()}


def _shutdown(sock: Any) -> None:
    """Wake whoever is blocked reading ``sock`` (shutdown does, close does not), ignoring a dead socket."""
    with contextlib.suppress(OSError, AttributeError, ValueError):
        sock.shutdown(socket.SHUT_RDWR)

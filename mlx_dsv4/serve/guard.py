"""What a request must show before the server reads a byte of its body: a Host this server
answers to, an Origin the user allowed, the API key (once), and a JSON body.

Why: a web page the user visits can send requests to a server on their machine. Without CORS
headers it cannot read the replies, but it could still spend the model (a "simple" request:
`text/plain` or form bodies need no preflight) and, through a DNS name that it points at
127.0.0.1 (DNS rebinding), even read them. So the Host must be a name of this machine, a request
from a page (browsers always send `Origin` on a cross-origin POST) must come from a page named
with `--cors-origin` or from the server's own chat page, and a body must declare JSON. The key is checked on the headers alone, so a
keyless upload is refused before it is received.

Each check is a pure function of the request's headers that returns the `APIError` to answer, or
None. Header names are lower-case bytes, as ASGI gives them; values are compared as latin-1.
"""

from __future__ import annotations

import ipaddress
import secrets
import socket
from dataclasses import dataclass
from typing import Iterable, Sequence
from urllib.parse import urlsplit

from .schema import APIError

LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
KEY_HEADERS = (b"authorization", b"x-api-key", b"api-key")  # B1: where clients put the key
JSON_TYPES = ("application/json",)


@dataclass(frozen=True)
class Hosts:
    """The `Host` header values a server answers to (any port): `names`, and with `any_ip` any IP
    address (a rebinding page must use a DNS name); `everything` turns the check off."""

    names: frozenset[str] = LOOPBACK_NAMES
    any_ip: bool = False
    everything: bool = False

    def allows(self, host: str) -> bool:
        if self.everything:
            return True
        name = _host_name(host)
        if name in self.names:
            return True
        if self.any_ip:
            try:
                ipaddress.ip_address(name)
                return True
            except ValueError:
                return False
        return False


LOOPBACK = Hosts()


def is_loopback(bind: str) -> bool:
    """Whether a listening address reaches only this machine ('localhost', 127.x, ::1)."""
    if bind.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(bind.strip("[]")).is_loopback
    except ValueError:
        return False


def hosts_for(bind: str, allow: Sequence[str] = ()) -> Hosts:
    """The Host rule for a server listening on `bind`, widened by `--allow-host` names ('*': any).

    On a loopback address only localhost, 127.0.0.1 and [::1] (the names a local client uses) and
    the `allow` names. On any other address clients reach the server by its IP address, by this
    machine's name, or by a name of the user's network, so any IP address, this machine's name
    (with and without `.local`) and the loopback names pass too; other DNS names need `allow`."""
    names = {_host_name(a) for a in allow if a != "*"}
    if "*" in allow:
        return Hosts(everything=True)
    if is_loopback(bind):
        return Hosts(LOOPBACK_NAMES | names)
    machine = socket.gethostname().lower().removesuffix(".local")
    return Hosts(LOOPBACK_NAMES | names | {machine, machine + ".local"}, any_ip=True)


def normal_origin(origin: str) -> str:
    """An origin as a browser sends it: `scheme://host[:port]`, lower case, no path; ValueError
    for anything else."""
    parts = urlsplit(origin.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.path.strip("/") \
            or parts.query or parts.fragment or parts.username:
        raise ValueError(f"{origin!r} is not an origin; write it as the browser's address bar shows "
                         "the page's site, e.g. http://localhost:3000 (scheme, host and port, no path).")
    return f"{parts.scheme}://{parts.netloc.lower()}"


def check_host(headers: list[tuple[bytes, bytes]], hosts: Hosts) -> APIError | None:
    sent = _values(headers, b"host")
    if not sent or hosts.allows(sent[0]):  # HTTP/1.0 clients may send none; browsers always do
        return None
    name = _host_name(sent[0])
    return APIError(403, f"The Host header names {sent[0]!r}, which is not a name of this server; "
                    "a web page can reach a local server through such a name (DNS rebinding), so "
                    f"it is refused. If you reach the server under that name, start it with "
                    f"--allow-host {name}.", code="host_not_allowed")


def check_origin(headers: list[tuple[bytes, bytes]], origins: Iterable[str]) -> APIError | None:
    """A page's request passes when the user named its origin, or when it is this server's own
    page (the chat at `/`): its origin's host and port are the `Host` it asked, which `check_host`
    has already found to be a name of this server, so a rebinding page cannot pass this way."""
    sent = _values(headers, b"origin")
    if not sent or sent[0].lower() in origins or "*" in origins:
        return None
    host = _values(headers, b"host")
    if host and urlsplit(sent[0].strip()).netloc.lower() == host[0].strip().lower():
        return None
    return APIError(403, f"Requests from web pages are refused unless the page is allowed, and "
                    f"{sent[0]!r} is not: start the server with --cors-origin {sent[0]} to let that "
                    "page use it.", code="origin_not_allowed")


def check_key(headers: list[tuple[bytes, bytes]], key: str | None) -> APIError | None:
    """The key as a bearer token (any case of "Bearer"), in `x-api-key` or in `api-key`, compared
    in constant time. A header sent twice, or two headers with different keys, is refused: which
    one counts would otherwise be a guess."""
    if not key:
        return None
    sent = []
    for name in KEY_HEADERS:
        values = _values(headers, name)
        if len(values) > 1:
            return APIError(400, f"The {name.decode()} header is sent {len(values)} times; send the API "
                            "key once.", code="invalid_api_key")
        if values and name == b"authorization":
            scheme, _, token = values[0].strip().partition(" ")
            values = [token.strip()] if scheme.lower() == "bearer" else []
        sent += values
    if len(set(sent)) > 1:
        return APIError(401, "The request carries different API keys in its Authorization, x-api-key "
                        "or api-key headers; send one.", code="invalid_api_key")
    if not sent or not secrets.compare_digest(sent[0].encode("latin-1"), key.encode()):
        return APIError(401, "Incorrect API key provided.", code="invalid_api_key")
    return None


def check_json(headers: list[tuple[bytes, bytes]]) -> APIError | None:
    """A POST body must be declared JSON (`application/json`, any charset). A body with no
    Content-Type is read as JSON (B1): browsers send an `Origin` with every cross-origin POST, so
    `check_origin` has already refused a page's."""
    sent = _values(headers, b"content-type")
    kind = sent[0].partition(";")[0].strip().lower() if sent else ""
    if not kind or kind in JSON_TYPES:
        return None
    return APIError(415, f"The body is sent as {kind!r}; this server reads JSON only: send it with "
                    "Content-Type: application/json.", code="unsupported_media_type")


def _values(headers: list[tuple[bytes, bytes]], name: bytes) -> list[str]:
    return [v.decode("latin-1") for k, v in headers if k == name]


def _host_name(host: str) -> str:
    """'LocalHost:8000' -> 'localhost', '[::1]:8000' -> '::1'."""
    host = host.strip().lower()
    if host.startswith("["):
        host = host[1:].partition("]")[0]
    elif host.count(":") == 1:
        host = host.rpartition(":")[0]
    return host.rstrip(".")

"""Where task media may be fetched from, and a requests session that keeps to it.

A task's image URL is written by whoever can import tasks into Label Studio.
Fetched naively from inside the backend's network, ``http://169.254.169.254/``
or ``http://10.0.0.5:6379/`` would reach cloud metadata services, databases and
admin pages that only the backend can reach (server-side request forgery). So,
by default, media is only fetched over http(s) from public addresses, from the
Label Studio host itself (any address, its own port), and from hosts an
operator lists:

- ``SAM_MEDIA_ALLOWED_HOSTS``: comma-separated names, addresses or networks;
  ``minio`` allows every port of that name, ``minio:9000`` that port only,
  ``10.0.0.5`` / ``[fd00::5]:9000`` / ``10.1.0.0/16`` addresses a name resolves to.
- ``SAM_MEDIA_ALLOW_PRIVATE=1``: loopback, private and shared (CGNAT) networks.
  Link-local (where cloud metadata answers), multicast, unspecified and
  reserved addresses stay refused unless listed.
- ``SAM_MAX_DOWNLOAD_MB``: the largest body read from a media host (default 100).

:class:`MediaSession` checks every request, and every redirect hop, before it
is sent: the scheme, the name, and every address the name resolves to. Its
connections then resolve the name once more, check those addresses again and
connect to exactly the addresses checked, so a name that resolves to a public
address for the check and to a private one for the connection (DNS rebinding)
is refused too. Behind an HTTP proxy (``HTTP_PROXY``/``HTTPS_PROXY``) the
proxy resolves and connects: only the first check applies there, so a name
that rebinds between the check and the proxy's own lookup is a residual risk.
"""

from __future__ import annotations

import functools
import ipaddress
import logging
import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass, replace
from urllib.parse import urlsplit

import requests
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.exceptions import ConnectTimeoutError, NameResolutionError, NewConnectionError
from urllib3.util.connection import create_connection

from sam_backend.env import env_number
from sam_backend.errors import MediaRefusedError, MediaTooLargeError

logger = logging.getLogger(__name__)

#: Largest media body read, in MB; ``SAM_MAX_DOWNLOAD_MB`` overrides it.
DEFAULT_MAX_DOWNLOAD_MB = 100.0
#: Redirects followed per download; each hop is checked like the first URL.
MAX_REDIRECTS = 5

_SCHEME_PORTS = {"http": 80, "https": 443}
_SHARED_NETWORK = ipaddress.IPv4Network("100.64.0.0/10")  # carrier-grade NAT, RFC 6598
_NAT64_NETWORK = ipaddress.IPv6Network("64:ff9b::/96")  # RFC 6052: an IPv4 address in the low 32 bits
#: What ``SAM_MEDIA_ALLOW_PRIVATE`` opens; the other kinds need an explicit entry.
_PRIVATE_KINDS = frozenset({"loopback", "private", "shared (CGNAT)", "site-local", "non-global"})
_TRUE = {"1", "true", "yes", "on"}

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def address_kind(address: str | IPAddress) -> str | None:
    """Why an address is not a public one (``"loopback"``, ``"link-local"``...), or None if it is.

    IPv4 addresses inside IPv6 ones (IPv4-mapped ``::ffff:a.b.c.d``, 6to4,
    NAT64 ``64:ff9b::/96``) are judged by the IPv4 address they reach.

    Example:
        >>> address_kind("169.254.169.254"), address_kind("::ffff:10.0.0.5"), address_kind("8.8.8.8")
        ('link-local', 'private', None)
    """
    ip = ipaddress.ip_address(address) if isinstance(address, str) else address
    ip = _embedded_ipv4(ip) or ip
    if ip.is_unspecified:
        return "unspecified"
    if ip.is_loopback:
        return "loopback"
    if ip.is_link_local:
        return "link-local"
    if ip.is_multicast:
        return "multicast"
    if ip.version == 6 and ip.is_site_local:
        return "site-local"
    if ip.version == 4 and ip in _SHARED_NETWORK:
        return "shared (CGNAT)"
    if ip.is_reserved:
        return "reserved"
    if ip.is_private:
        return "private"
    if not ip.is_global:
        return "non-global"
    return None


def _embedded_ipv4(ip: IPAddress) -> ipaddress.IPv4Address | None:
    if ip.version != 6:
        return None
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip in _NAT64_NETWORK:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def _host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _normal_name(host: str) -> str:
    return host.lower().rstrip(".")


@dataclass(frozen=True)
class MediaPolicy:
    """Which hosts task media may come from.

    Attributes:
        allow_private: loopback, private and shared (CGNAT) addresses are allowed.
        allowed_names: ``(name, port or None)`` pairs allowed whatever they resolve to.
        allowed_networks: ``(network, port or None)`` pairs of allowed addresses.
        labelstudio: ``(name, port)`` of the Label Studio host, allowed whatever it resolves to.

    Example:
        >>> policy = MediaPolicy.from_env({"SAM_MEDIA_ALLOWED_HOSTS": "minio:9000, 10.1.0.0/16"})
        >>> policy.check_url("http://169.254.169.254/latest/meta-data/")  # doctest: +SKIP
        Traceback (most recent call last):
        sam_backend.errors.MediaRefusedError: Refused to fetch http://169.254.169.254/latest/meta-data/: ...
        >>> policy.for_labelstudio("http://localhost:8080").check_url("http://localhost:8080/data/upload/1/a.png")
    """

    allow_private: bool = False
    allowed_names: tuple[tuple[str, int | None], ...] = ()
    allowed_networks: tuple[tuple[IPNetwork, int | None], ...] = ()
    labelstudio: tuple[str, int] | None = None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "MediaPolicy":
        """The policy of ``SAM_MEDIA_ALLOWED_HOSTS`` and ``SAM_MEDIA_ALLOW_PRIVATE``.

        Entries that cannot be parsed are logged and ignored (their hosts stay refused).
        """
        environ = os.environ if environ is None else environ
        names: list[tuple[str, int | None]] = []
        networks: list[tuple[IPNetwork, int | None]] = []
        for entry in (environ.get("SAM_MEDIA_ALLOWED_HOSTS") or "").replace(" ", ",").split(","):
            if not entry.strip():
                continue
            parsed = _parse_allowed(entry.strip())
            if parsed is None:
                logger.warning("SAM_MEDIA_ALLOWED_HOSTS: cannot read %r (expected name, name:port, address, "
                               "[IPv6]:port or network); ignored.", entry)
            elif isinstance(parsed[0], str):
                names.append(parsed)
            else:
                networks.append(parsed)
        allow_private = (environ.get("SAM_MEDIA_ALLOW_PRIVATE") or "").strip().lower() in _TRUE
        return cls(allow_private=allow_private, allowed_names=tuple(names), allowed_networks=tuple(networks))

    def for_labelstudio(self, url: str | None) -> "MediaPolicy":
        """This policy with the host of Label Studio's ``url`` (its own port) allowed."""
        if not url:
            return self
        try:
            parts = urlsplit(url)
            port = parts.port or _SCHEME_PORTS.get(parts.scheme.lower())
        except ValueError:
            return self
        if not parts.hostname or port is None:
            return self
        return replace(self, labelstudio=(_normal_name(parts.hostname), port))

    def check_url(self, url: str) -> None:
        """Refuse ``url`` unless it is http(s) and its host, and every address it resolves to, is allowed.

        Raises:
            MediaRefusedError: what was refused and which setting allows it.
            requests.exceptions.ConnectionError: the name does not resolve.
        """
        host, port = self.check_form(url)
        try:
            self.addresses(host, port, target=url)
        except socket.gaierror as exc:
            raise requests.exceptions.ConnectionError(f"Cannot resolve {host}: {exc}") from None

    @staticmethod
    def check_form(url: str) -> tuple[str, int]:
        """``(host, port)`` of an http(s) URL; anything else is refused (no DNS lookup here).

        Raises:
            MediaRefusedError: another scheme (``file://``, ``ftp://``...), a bare path, no host.

        Example:
            >>> MediaPolicy.check_form("https://example.com/cat.jpg")
            ('example.com', 443)
        """
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        if scheme not in _SCHEME_PORTS:
            raise MediaRefusedError(
                f"Refused to fetch {url}: only http(s) URLs and Label Studio's own paths (/data/upload/..., "
                "/data/local-files/?d=..., s3://, gs://, azure-blob://) are fetched."
            )
        try:
            port = parts.port or _SCHEME_PORTS[scheme]
        except ValueError:
            raise MediaRefusedError(f"Refused to fetch {url}: its port is not a number.") from None
        if not parts.hostname:
            raise MediaRefusedError(f"Refused to fetch {url}: it names no host.")
        return parts.hostname, port

    def addresses(self, host: str, port: int, target: str | None = None) -> list[str]:
        """The addresses ``host`` resolves to, each checked; connect to these and no others.

        Raises:
            MediaRefusedError: one of them is not allowed (the whole name is refused).
            socket.gaierror: the name does not resolve.
        """
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        found = list(dict.fromkeys(info[4][0] for info in infos))
        if self._name_allowed(host, port):
            return found
        for address in found:
            ip = ipaddress.ip_address(address)
            kind = address_kind(ip)
            if kind is None or self._address_allowed(ip, port, kind):
                continue
            raise MediaRefusedError(self._refusal(target or _host_port(host, port), host, port, ip, kind))
        return found

    def _name_allowed(self, host: str, port: int) -> bool:
        name = _normal_name(host)
        if self.labelstudio == (name, port):
            return True
        return any(name == allowed and allowed_port in (None, port) for allowed, allowed_port in self.allowed_names)

    def _address_allowed(self, ip: IPAddress, port: int, kind: str) -> bool:
        if self.allow_private and kind in _PRIVATE_KINDS:
            return True
        candidates = [ip, _embedded_ipv4(ip)]
        return any(
            candidate is not None and candidate.version == network.version and candidate in network
            and allowed_port in (None, port)
            for candidate in candidates for network, allowed_port in self.allowed_networks
        )

    def _refusal(self, target: str, host: str, port: int, ip: IPAddress, kind: str) -> str:
        where = f"{host} is a {kind} address" if _is_literal(host, ip) else f"{host} resolves to {ip}, a {kind} address"
        entry = _host_port(host, port)
        message = (
            f"Refused to fetch {target}: {where}. Task media is not fetched from loopback, private, link-local "
            "or reserved addresses, so that task data cannot reach the backend's own network. "
        )
        if kind in _PRIVATE_KINDS:
            return message + (
                f'To allow this host add "{entry}" (or "{host}" for every port) to SAM_MEDIA_ALLOWED_HOSTS, '
                "or set SAM_MEDIA_ALLOW_PRIVATE=1 to allow private networks."
            )
        return message + (
            f"SAM_MEDIA_ALLOW_PRIVATE does not open {kind} addresses (cloud metadata services answer on "
            f'link-local ones); if this host is meant, add "{entry}" to SAM_MEDIA_ALLOWED_HOSTS.'
        )


def _is_literal(host: str, ip: IPAddress) -> bool:
    try:
        return ipaddress.ip_address(host) == ip
    except ValueError:
        return False


def _parse_allowed(entry: str) -> tuple[str | IPNetwork, int | None] | None:
    """``(name or network, port or None)`` of one ``SAM_MEDIA_ALLOWED_HOSTS`` entry, None if unreadable."""
    entry = entry.lower()
    try:
        return ipaddress.ip_network(entry, strict=False), None  # "10.0.0.5", "fd00::5", "10.1.0.0/16"
    except ValueError:
        pass
    try:
        parts = urlsplit("//" + entry)
        host, port = parts.hostname, parts.port
    except ValueError:
        return None
    if not host or parts.path or parts.query or parts.username:
        return None
    try:
        return ipaddress.ip_network(host), port  # "10.0.0.5:9000", "[fd00::5]:9000"
    except ValueError:
        return _normal_name(host), port


def max_download_bytes(environ: Mapping[str, str] | None = None) -> int:
    """``SAM_MAX_DOWNLOAD_MB`` in bytes (default 100 MB)."""
    return int(env_number("SAM_MAX_DOWNLOAD_MB", DEFAULT_MAX_DOWNLOAD_MB, environ) * 1024 * 1024)


# ------------------------------------------------------------ checked connections


class _CheckedConnectionMixin:
    """Resolves, checks, and connects to the checked addresses only (no second lookup to rebind)."""

    media_policy: MediaPolicy

    def _new_conn(self) -> socket.socket:
        try:
            addresses = self.media_policy.addresses(self.host, self.port)
        except socket.gaierror as exc:
            raise NameResolutionError(self.host, self, exc) from exc
        error: Exception | None = None
        for address in addresses:
            try:
                return create_connection((address, self.port), self.timeout, source_address=self.source_address,
                                         socket_options=self.socket_options)
            except socket.timeout as exc:
                error = ConnectTimeoutError(self, f"Connection to {self.host} timed out. (connect timeout={self.timeout})")
                error.__cause__ = exc
            except OSError as exc:
                error = NewConnectionError(self, f"Failed to establish a new connection: {exc}")
                error.__cause__ = exc
        raise error or NewConnectionError(self, f"{self.host} resolves to no address")


class _CheckedHTTPConnection(_CheckedConnectionMixin, HTTPConnection):
    pass


class _CheckedHTTPSConnection(_CheckedConnectionMixin, HTTPSConnection):
    pass


class _CheckedPoolMixin:
    def __init__(self, *args, media_policy: MediaPolicy, **kwargs):
        super().__init__(*args, **kwargs)
        self.media_policy = media_policy

    def _new_conn(self):
        connection = super()._new_conn()
        connection.media_policy = self.media_policy  # read when it connects, after this
        return connection


class _CheckedHTTPConnectionPool(_CheckedPoolMixin, HTTPConnectionPool):
    ConnectionCls = _CheckedHTTPConnection


class _CheckedHTTPSConnectionPool(_CheckedPoolMixin, HTTPSConnectionPool):
    ConnectionCls = _CheckedHTTPSConnection


class _CheckedAdapter(HTTPAdapter):
    """Direct connections through checked pools; proxied ones keep urllib3's (the proxy connects)."""

    def __init__(self, policy: MediaPolicy, **kwargs):
        self.media_policy = policy
        super().__init__(**kwargs)

    def init_poolmanager(self, *args, **kwargs):
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = {
            "http": functools.partial(_CheckedHTTPConnectionPool, media_policy=self.media_policy),
            "https": functools.partial(_CheckedHTTPSConnectionPool, media_policy=self.media_policy),
        }


class MediaSession(requests.Session):
    """A requests session for task media: checked destinations, a timeout, a size cap.

    Every request and every redirect hop (at most :data:`MAX_REDIRECTS`) is
    checked by ``policy`` before it is sent, and its connection checks the
    addresses it connects to. Bodies are read, at most ``max_bytes`` of them,
    before the response is returned, so a caller that writes the body to a
    file never writes a cut one.

    Args:
        policy: where media may come from.
        timeout: seconds per connect and per read, unless a request gives its own.
        max_bytes: the largest body read (``SAM_MAX_DOWNLOAD_MB`` by default).

    Example:
        >>> with MediaSession(MediaPolicy.from_env(), timeout=30) as session:  # doctest: +SKIP
        ...     session.get("https://example.com/cat.jpg").content[:4]
        b'\\xff\\xd8\\xff\\xe0'
    """

    def __init__(self, policy: MediaPolicy, timeout: float, max_bytes: int | None = None):
        super().__init__()
        self.policy = policy
        self.timeout = timeout
        self.max_bytes = max_download_bytes() if max_bytes is None else max_bytes
        self.max_redirects = MAX_REDIRECTS
        adapter = _CheckedAdapter(policy)
        self.mount("http://", adapter)
        self.mount("https://", adapter)

    def request(self, *args, **kwargs):
        kwargs.setdefault("timeout", self.timeout)
        return super().request(*args, **kwargs)

    def send(self, request: requests.PreparedRequest, **kwargs) -> requests.Response:
        """Send ``request`` and follow its redirects here, each hop checked and its body capped."""
        follow = kwargs.pop("allow_redirects", True)
        response = self._send_checked(request, **kwargs)
        if not follow:
            return response
        # requests' own redirect logic (Location parsing, method and auth rebuilding, the
        # max_redirects bound), which sends each hop through this method with follow off.
        hops = list(self.resolve_redirects(response, request, **kwargs))
        if hops:
            hops.insert(0, response)
            response = hops.pop()
            response.history = hops
        return response

    def _send_checked(self, request: requests.PreparedRequest, **kwargs) -> requests.Response:
        self.policy.check_url(request.url)
        kwargs.setdefault("timeout", self.timeout)
        # The adapter, not Session.send: that one reads a redirect's whole body, uncapped.
        response = self.get_adapter(request.url).send(request, **kwargs)
        try:
            self._read_capped(response)
        except BaseException:
            response.close()
            raise
        return response

    def _read_capped(self, response: requests.Response) -> None:
        limit = self.max_bytes
        advertised = response.headers.get("Content-Length", "")
        if advertised.isdigit() and int(advertised) > limit:
            raise MediaTooLargeError(
                f"{response.url} is {_megabytes(int(advertised))} MB, more than the download limit of "
                f"{_megabytes(limit)} MB (SAM_MAX_DOWNLOAD_MB)."
            )
        chunks, size = [], 0
        for chunk in response.iter_content(64 * 1024):
            size += len(chunk)
            if size > limit:
                raise MediaTooLargeError(
                    f"{response.url} sent more than the download limit of {_megabytes(limit)} MB "
                    "(SAM_MAX_DOWNLOAD_MB); the download was stopped."
                )
            chunks.append(chunk)
        # What Response.content would have read, kept where it looks for it.
        response._content = b"".join(chunks)


def _megabytes(size: int) -> str:
    return f"{size / (1024 * 1024):.3g}"

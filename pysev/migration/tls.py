"""TLS for migration connections, as QEMU does it (``crypto/tlscredsx509.c``, ``migration/tls.c``,
``authz/simple.c``): x509 credentials loaded from a directory, a hostname the server certificate must
match, and an authorization object the client certificate's distinguished name must satisfy.

The directory holds QEMU's file names: ``ca-cert.pem`` (always), ``server-cert.pem`` and
``server-key.pem`` (server endpoint), ``client-cert.pem`` and ``client-key.pem`` (client endpoint; needed
when the server verifies its peers). With ``verify-peer`` on (the default) a server requires a client
certificate signed by ``ca-cert.pem`` and a client checks the server's certificate against
``ca-cert.pem`` and the hostname. Sessions are TLS 1.3 (OpenSSL's AES-GCM suites come first).

The files are loaded once, when the object is created (QEMU does the same); the private keys stay inside
OpenSSL's context and never appear in a repr or a log line.
"""

from __future__ import annotations

import errno
import os
import re
import socket
import ssl

CA_CERT = "ca-cert.pem"
SERVER_CERT = "server-cert.pem"
SERVER_KEY = "server-key.pem"
CLIENT_CERT = "client-cert.pem"
CLIENT_KEY = "client-key.pem"
ENDPOINTS = ("client", "server")

# RFC 4514 attribute types by the names Python's ssl module gives them; gnutls (and so QEMU's peer
# name) prints the PKCS#9 e-mail address as EMAIL. Other attributes keep Python's name.
_DN_KEYS = {
    "commonName": "CN",
    "countryName": "C",
    "localityName": "L",
    "stateOrProvinceName": "ST",
    "organizationName": "O",
    "organizationalUnitName": "OU",
    "streetAddress": "STREET",
    "domainComponent": "DC",
    "userId": "UID",
    "emailAddress": "EMAIL",
}
_SSL_SUFFIX = re.compile(r" \(_ssl\.c:\d+\)$")


class TlsError(ValueError):
    """Credentials that cannot be used: a missing or unreadable file, a wrong endpoint (QEMU's words)."""


def describe(err: BaseException) -> str:
    """An OpenSSL error as one readable line (without CPython's source location)."""
    if isinstance(err, ssl.SSLCertVerificationError):
        return f"certificate verify failed: {err.verify_message}"
    text = _SSL_SUFFIX.sub("", str(err))
    reason = getattr(err, "reason", None) or ""
    if "ALERT" in reason:
        return f"alert from the peer: {text}"
    return text


def _check_readable(path: str) -> None:
    """QEMU's ``qcrypto_tls_creds_get_path``: the file must exist and be readable (not read here)."""
    try:
        with open(path, "rb"):
            pass
    except OSError as err:
        raise TlsError(f"Unable to access credentials {path}: {err.strerror or os.strerror(err.errno or 0)}") from None


class TlsCredsX509:
    """QEMU's ``tls-creds-x509`` object: ``id``, ``dir``, ``endpoint`` (client or server), ``verify-peer``."""

    qom_type = "tls-creds-x509"

    def __init__(self, id: str, dir: str | None, *, endpoint: str = "client", verify_peer: bool = True) -> None:
        if endpoint not in ENDPOINTS:
            raise TlsError(f"Parameter 'endpoint' does not accept value '{endpoint}'")
        if not dir:
            raise TlsError("Missing 'dir' property value")
        self.id = id
        self.dir = dir
        self.endpoint = endpoint
        self.verify_peer = verify_peer
        self.context = self._load()

    def __repr__(self) -> str:
        return (
            f"TlsCredsX509(id={self.id!r}, dir={self.dir!r}, endpoint={self.endpoint!r}, "
            f"verify_peer={self.verify_peer})"
        )

    def _required(self, name: str) -> str:
        path = os.path.join(self.dir, name)
        _check_readable(path)
        return path

    def _optional(self, name: str) -> str | None:
        return self._required(name) if os.path.exists(os.path.join(self.dir, name)) else None

    def _load(self) -> ssl.SSLContext:
        ca = self._required(CA_CERT)
        server = self.endpoint == "server"
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        try:
            ctx.load_verify_locations(cafile=ca)
        except (ssl.SSLError, ValueError) as err:
            raise TlsError(f"Unable to import CA certificate list {ca}: {describe(err)}") from None
        cert: str | None
        key: str | None
        if server:
            cert, key = self._required(SERVER_CERT), self._required(SERVER_KEY)
            ctx.num_tickets = 0  # no session resumption: every migration connection is a full handshake
            ctx.verify_mode = ssl.CERT_REQUIRED if self.verify_peer else ssl.CERT_NONE
        else:
            cert, key = self._optional(CLIENT_CERT), self._optional(CLIENT_KEY)
            if (cert is None) != (key is None):
                missing = os.path.join(self.dir, CLIENT_KEY if key is None else CLIENT_CERT)
                raise TlsError(f"Unable to access credentials {missing}: {os.strerror(errno.ENOENT)}")
            if not self.verify_peer:
                ctx.check_hostname = False
                ctx.verify_mode = ssl.CERT_NONE
        if cert is not None and key is not None:
            try:
                ctx.load_cert_chain(cert, key)
            except ssl.SSLError as err:
                raise TlsError(f"Cannot load certificate '{cert}' & key '{key}': {describe(err)}") from None
        return ctx

    def check_endpoint(self, endpoint: str) -> None:
        """QEMU's ``qcrypto_tls_creds_check_endpoint``."""
        if self.endpoint != endpoint:
            raise TlsError(f"Expected TLS credentials for a {endpoint} endpoint")

    def client_session(self, sock: socket.socket, hostname: str) -> ssl.SSLSocket:
        """The client's TLS handshake on ``sock`` (blocking, within the socket's timeout). The server's
        certificate must match ``hostname`` (when verify-peer is on). Raises ssl.SSLError / OSError."""
        self.check_endpoint("client")
        ssock = self.context.wrap_socket(
            sock, server_hostname=hostname if self.verify_peer else None, do_handshake_on_connect=False
        )
        return _handshake(ssock)

    def server_session(self, sock: socket.socket) -> ssl.SSLSocket:
        """The server's TLS handshake on an accepted ``sock`` (blocking, within the socket's timeout)."""
        self.check_endpoint("server")
        ssock = self.context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        return _handshake(ssock)


def _handshake(ssock: ssl.SSLSocket) -> ssl.SSLSocket:
    """The wrapped socket owns the connection now: close it if the handshake fails."""
    try:
        ssock.do_handshake()
    except BaseException:
        ssock.close()
        raise
    return ssock


class AuthzSimple:
    """QEMU's ``authz-simple`` object: one identity, allowed when it equals the peer's name. For
    ``tls-authz`` the name is the client certificate's distinguished name in RFC 4514 form, as QEMU
    (gnutls) prints it, e.g. ``CN=src.example.com,O=Example Org,C=GB``."""

    qom_type = "authz-simple"

    def __init__(self, id: str, identity: str) -> None:
        self.id = id
        self.identity = identity

    def __repr__(self) -> str:
        return f"AuthzSimple(id={self.id!r}, identity={self.identity!r})"

    def is_allowed(self, name: str) -> bool:
        return name == self.identity


def _escape(value: str) -> str:
    """RFC 4514 section 2.4."""
    out = "".join("\\" + c if c in ',+"\\<>;' else c for c in value)
    if out.startswith(("#", " ")):
        out = "\\" + out
    if out.endswith(" ") and not out.endswith("\\ "):
        out = out[:-1] + "\\ "
    return out


def distinguished_name(cert: dict) -> str:
    """The subject of a certificate as ``SSLSocket.getpeercert()`` decodes it, in RFC 4514 form (last
    RDN first, multi-valued RDNs joined with '+')."""
    rdns = []
    for rdn in reversed(cert.get("subject", ())):
        rdns.append("+".join(f"{_DN_KEYS.get(key, key)}={_escape(value)}" for key, value in rdn))
    return ",".join(rdns)


def peer_name(ssock: ssl.SSLSocket) -> str:
    """The distinguished name of the certificate the peer presented ('' when it presented none)."""
    cert = ssock.getpeercert()
    return distinguished_name(cert) if cert else ""


def check_authz(ssock: ssl.SSLSocket, authz: AuthzSimple | None) -> str | None:
    """QEMU's ``qcrypto_tls_session_check_credentials`` authz step: None when allowed, else why not."""
    if authz is None:
        return None
    name = peer_name(ssock)
    if not name:
        return "No certificate peer"
    if not authz.is_allowed(name):
        return f"TLS x509 authz check for {name} is denied"
    return None


def session_summary(ssock: ssl.SSLSocket) -> str:
    """Protocol and cipher of an established session, for the log (no key material)."""
    cipher = ssock.cipher()
    return f"{ssock.version()} {cipher[0] if cipher else '?'}"

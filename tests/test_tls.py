"""TLS migration, the QEMU way: tls-creds-x509 objects in QEMU's directory layout, tls-hostname, tls-authz,
TLS on every connection (main, page channels, resume). The transport on its own (bulk reads over TLS,
refusals and their reasons), then two ``pysev vm`` processes driven with the real ``qemu.qmp`` client:
a TLS migration with page channels, a plain source refused by a TLS destination, wrong CA / hostname /
authz, a bit flipped in transit, and a commit delivered again on a TLS resume connection.

Certificates are made at test time with ``cryptography`` (EC P-256) in a temporary directory.
"""

from __future__ import annotations

import datetime
import importlib.util
import ipaddress
import os
import pathlib
import socket
import subprocess
import sys
import threading
import time

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from pysev.migration import stream, transport
from pysev.migration.tls import AuthzSimple, TlsCredsX509, TlsError

_spec = importlib.util.spec_from_file_location("_vm_qmp_helpers", pathlib.Path(__file__).with_name("test_vm_qmp.py"))
Q = sys.modules.get("_vm_qmp_helpers") or importlib.util.module_from_spec(_spec)
if "_vm_qmp_helpers" not in sys.modules:
    sys.modules["_vm_qmp_helpers"] = Q
    _spec.loader.exec_module(Q)
vms = Q.vms  # the fixture


pytestmark = pytest.mark.usefixtures("legacy_qmp_event_loop")


# The client certificate's subject has characters RFC 4514 escapes, so tls-authz's comparison is tested too.
CLIENT_DN = "CN=src.pysev.test,OU=mig\\+ration,O=pysev\\, tests,C=GB"
APP_DATA = 23  # TLS record type application_data (every record after the handshake, in TLS 1.3)


# -- a PKI in QEMU's directory layout ---------------------------------------------------------------------


def _name(cn: str, ou: str | None = None, o: str = "pysev, tests") -> x509.Name:
    attrs = [x509.NameAttribute(NameOID.COUNTRY_NAME, "GB"), x509.NameAttribute(NameOID.ORGANIZATION_NAME, o)]
    if ou:
        attrs.append(x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, ou))
    return x509.Name([*attrs, x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _cert(subject, issuer, key, signer, *, ca: bool, sans=()) -> x509.Certificate:
    now = datetime.datetime.now(datetime.timezone.utc)
    b = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if sans:
        b = b.add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
    return b.sign(signer, hashes.SHA256())


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _key_pem(key) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def make_pki(root: pathlib.Path) -> dict[str, str]:
    """Directories in QEMU's layout, by role: ``server`` (localhost, 127.0.0.1), ``client`` (CLIENT_DN),
    ``client-other`` (another name, same CA), ``client-rogue`` (a certificate from another CA),
    ``client-wrong-ca`` (trusts the other CA: cannot verify the server), ``client-nocert``."""
    keys = {}

    def key(name):
        keys[name] = ec.generate_private_key(ec.SECP256R1())
        return keys[name]

    ca_name, rogue_name = _name("pysev test CA"), _name("rogue CA")
    ca = _cert(ca_name, ca_name, key("ca"), keys["ca"], ca=True)
    rogue = _cert(rogue_name, rogue_name, key("rogue"), keys["rogue"], ca=True)
    sans = (x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1")))
    server = _cert(_name("dst.pysev.test"), ca_name, key("server"), keys["ca"], ca=False, sans=sans)
    client = _cert(_name("src.pysev.test", "mig+ration"), ca_name, key("client"), keys["ca"], ca=False)
    other = _cert(_name("intruder.pysev.test"), ca_name, key("other"), keys["ca"], ca=False)
    rogue_client = _cert(_name("src.pysev.test", "mig+ration"), rogue_name, key("rc"), keys["rogue"], ca=False)
    assert client.subject.rfc4514_string() == CLIENT_DN
    layout = {
        "server": {
            "ca-cert.pem": _pem(ca),
            "server-cert.pem": _pem(server),
            "server-key.pem": _key_pem(keys["server"]),
        },
        "client": {
            "ca-cert.pem": _pem(ca),
            "client-cert.pem": _pem(client),
            "client-key.pem": _key_pem(keys["client"]),
        },
        "client-other": {
            "ca-cert.pem": _pem(ca),
            "client-cert.pem": _pem(other),
            "client-key.pem": _key_pem(keys["other"]),
        },
        "client-rogue": {
            "ca-cert.pem": _pem(ca),
            "client-cert.pem": _pem(rogue_client),
            "client-key.pem": _key_pem(keys["rc"]),
        },
        "client-wrong-ca": {
            "ca-cert.pem": _pem(rogue),
            "client-cert.pem": _pem(client),
            "client-key.pem": _key_pem(keys["client"]),
        },
        "client-nocert": {"ca-cert.pem": _pem(ca)},
    }
    dirs = {}
    for role, files in layout.items():
        d = root / role
        d.mkdir(parents=True)
        for name, data in files.items():
            (d / name).write_bytes(data)
            if name.endswith("-key.pem"):
                os.chmod(d / name, 0o600)
        dirs[role] = str(d)
    return dirs


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_pki(tmp_path_factory.mktemp("pki"))


def server_creds(pki, **kw) -> TlsCredsX509:
    return TlsCredsX509("tls0", pki["server"], endpoint="server", **kw)


def client_creds(pki, role: str = "client", **kw) -> TlsCredsX509:
    return TlsCredsX509("tls0", pki[role], endpoint="client", **kw)


# -- the credentials ----------------------------------------------------------------------------------------


def test_credentials_errors_name_the_path(pki, tmp_path):
    with pytest.raises(TlsError, match="Missing 'dir' property value"):
        TlsCredsX509("t", None)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(TlsError, match=f"Unable to access credentials {empty}/ca-cert.pem: No such file"):
        TlsCredsX509("t", str(empty), endpoint="server")
    half = tmp_path / "half"
    half.mkdir()
    for name in ("ca-cert.pem", "server-cert.pem"):
        (half / name).write_bytes((pathlib.Path(pki["server"]) / name).read_bytes())
    with pytest.raises(TlsError, match=f"Unable to access credentials {half}/server-key.pem"):
        TlsCredsX509("t", str(half), endpoint="server")
    (half / "client-cert.pem").write_bytes((pathlib.Path(pki["client"]) / "client-cert.pem").read_bytes())
    with pytest.raises(TlsError, match=f"Unable to access credentials {half}/client-key.pem"):
        TlsCredsX509("t", str(half), endpoint="client")
    (half / "server-key.pem").write_bytes((pathlib.Path(pki["client"]) / "client-key.pem").read_bytes())
    with pytest.raises(
        TlsError, match=f"Cannot load certificate '{half}/server-cert.pem' & key '{half}/server-key.pem'"
    ):
        TlsCredsX509("t", str(half), endpoint="server")
    (half / "ca-cert.pem").write_text("not a certificate\n")
    with pytest.raises(TlsError, match=f"Unable to import CA certificate list {half}/ca-cert.pem"):
        TlsCredsX509("t", str(half), endpoint="server")
    creds = server_creds(pki)
    with pytest.raises(TlsError, match="Expected TLS credentials for a client endpoint"):
        creds.check_endpoint("client")
    with pytest.raises(TlsError, match="Expected TLS credentials for a server endpoint"):
        transport.TcpListener("tcp:127.0.0.1:0", tls=client_creds(pki))
    with pytest.raises(TlsError, match="verify-peer=off"):
        transport.TcpListener(
            "tcp:127.0.0.1:0", tls=server_creds(pki, verify_peer=False), tls_authz=AuthzSimple("a", "x")
        )
    # No key material in what an object shows.
    text = repr(creds) + repr(vars(creds))
    assert "PRIVATE" not in text and "BEGIN" not in text
    assert repr(creds) == f"TlsCredsX509(id='tls0', dir='{pki['server']}', endpoint='server', verify_peer=True)"


# -- the transport ------------------------------------------------------------------------------------------


class Accepting:
    """Accepts migrations on a listener in a thread, as the VMM does; ``got`` collects them, ``errors`` the
    TransportErrors of accept() (the listener carries on)."""

    def __init__(self, listener: transport.TcpListener) -> None:
        self.listener = listener
        self.got: list[list[transport.Connection]] = []
        self.errors: list[str] = []
        self.arrived = threading.Semaphore(0)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            try:
                self.got.append(self.listener.accept())
            except transport.TransportError as err:
                self.errors.append(str(err))
                continue
            except OSError:
                return
            self.arrived.release()

    def next(self) -> list[transport.Connection]:
        assert self.arrived.acquire(timeout=10), self.errors
        return self.got[-1]

    def close(self) -> None:
        self.listener.close()
        self._thread.join(5)
        for conns in self.got:
            for c in conns:
                c.close()


@pytest.fixture
def tls_listener(pki):
    acc = Accepting(
        transport.TcpListener("tcp:127.0.0.1:0", tls=server_creds(pki), tls_authz=AuthzSimple("auth0", CLIENT_DN))
    )
    yield acc
    acc.close()


def test_tls_connections_bulk_reads_and_prompt_small_messages(pki, tls_listener):
    """Every connection is TLS 1.3 with AES-GCM; a burst turns the reader to bulk reads and the data
    arrives intact; after it a small message is read at once; a record read in small pieces never
    waits for the socket (its bytes are decrypted already); timeouts and shutdown work as without TLS."""
    src = transport.tcp_connect(tls_listener.listener.uri, 2, tls=client_creds(pki))
    dst = tls_listener.next()
    try:
        assert len(dst) == 3 and all(c.tls and c.tls.startswith("TLSv1.3") and "GCM" in c.tls for c in src + dst)
        payload = os.urandom(24 << 20)
        writer = threading.Thread(target=src[1].output.write, args=(payload,))
        writer.start()
        got, buf, reads = bytearray(), bytearray(8 << 20), 0
        while len(got) < len(payload):
            n = dst[1].input.readinto1(buf)
            assert n, "unexpected EOF"
            got += buf[:n]
            reads += 1
        writer.join()
        assert got == payload
        assert dst[1]._reader._bulk and reads < len(payload) // (1 << 20), reads
        t0 = time.monotonic()
        src[1].output.write(b"commit")
        assert dst[1].input.read(6) == b"commit"
        assert time.monotonic() - t0 < 1.0
        # One record, read three bytes at a time: after the first read the rest is in the session.
        src[1].output.write(bytes(range(90)))
        t0 = time.monotonic()
        pieces = [bytes(dst[1]._reader.read(3)) for _ in range(30)]
        assert b"".join(pieces) == bytes(range(90))
        assert time.monotonic() - t0 < transport.BULK_WAIT_MS / 1000 + 0.5
        # The return path, a timeout, and a reader released by shutdown.
        dst[0].output.write(b"RECEIVED")
        assert src[0].input.read(8) == b"RECEIVED"
        dst[0].set_timeout(0.2)
        with pytest.raises(TimeoutError):
            dst[0].input.read(1)
        dst[0].set_timeout(None)
        threading.Timer(0.2, dst[2].shutdown).start()
        assert dst[2].input.read(1) == b""
    finally:
        for c in src:
            c.close()


def test_one_tls_connection_written_and_read_by_two_threads(pki, tls_listener):
    """A destination may write FAILED on the main connection while another thread reads it: the SSL
    object is never used by two threads at once, and both directions stay intact."""
    (src,) = transport.tcp_connect(tls_listener.listener.uri, 0, tls=client_creds(pki))
    (dst,) = tls_listener.next()
    try:
        payload = os.urandom(16 << 20)
        back = [bytes([i]) * 1000 for i in range(200)]
        received, echoed = bytearray(), bytearray()

        def source_side():
            src.output.write(payload)
            while len(echoed) < sum(map(len, back)):
                echoed.extend(src.input.read1(1 << 16))

        def destination_writes():
            for message in back:
                dst.output.write(message)

        threads = [threading.Thread(target=source_side), threading.Thread(target=destination_writes)]
        for t in threads:
            t.start()
        while len(received) < len(payload):
            received.extend(dst.input.read1(1 << 20))
        for t in threads:
            t.join(20)
        assert received == payload and echoed == b"".join(back)
    finally:
        src.close()


def test_tls_listener_refuses_a_plain_source_and_goes_on(pki, tls_listener):
    (plain,) = transport.tcp_connect(tls_listener.listener.uri, 0)  # a plain source
    with pytest.raises(OSError):
        for _ in range(64):
            plain.output.write(bytes(1 << 20))
    plain.set_timeout(2.0)
    message = stream.read_return_message(plain.input)  # what the source's error-desc quotes
    assert message.kind == stream.ReturnMessage.FAILED and "requires TLS" in message.reason
    plain.close()
    src = transport.tcp_connect(tls_listener.listener.uri, 1, tls=client_creds(pki))
    assert len(tls_listener.next()) == 2
    for c in src:
        c.close()


def test_a_tls_source_at_a_plain_destination(pki):
    acc = Accepting(transport.TcpListener("tcp:127.0.0.1:0"))
    try:
        with pytest.raises(transport.TransportError, match="TLS handshake with 127.0.0.1:.* failed.*tls-creds"):
            transport.tcp_connect(acc.listener.uri, 0, tls=client_creds(pki))
        deadline = time.monotonic() + 5
        while not acc.errors and time.monotonic() < deadline:
            time.sleep(0.01)
        assert any("a TLS client connected" in e and "tls-creds is not set" in e for e in acc.errors), acc.errors
    finally:
        acc.close()


@pytest.mark.parametrize(
    ("role", "hostname", "expected"),
    [
        ("client-wrong-ca", None, "failed: certificate verify failed: self-signed certificate in certificate chain"),
        ("client", "wrong.pysev.test", "certificate verify failed: Hostname mismatch"),
        ("client-rogue", None, "alert unknown ca"),
        ("client-nocert", None, "alert certificate required"),
        ("client-other", None, "refused the connection: TLS x509 authz check for CN=intruder.pysev.test"),
    ],
)
def test_refusals_reach_the_source_with_their_reason(pki, tls_listener, role, hostname, expected):
    with pytest.raises(transport.TransportError, match=expected):
        transport.tcp_connect(tls_listener.listener.uri, 1, tls=client_creds(pki, role), tls_hostname=hostname)
    # A resume connection is checked the same way.
    with pytest.raises(transport.TransportError, match=expected):
        transport.tcp_resume(tls_listener.listener.uri, bytes(16), tls=client_creds(pki, role), tls_hostname=hostname)
    assert not tls_listener.got
    good = transport.tcp_connect(tls_listener.listener.uri, 0, tls=client_creds(pki), tls_hostname="localhost")
    assert len(tls_listener.next()) == 1
    good[0].close()


# -- two pysev vm processes ---------------------------------------------------------------------------------


def _tls_object(role: str, pki, endpoint: str, id: str = "tls0") -> dict:
    return {"qom-type": "tls-creds-x509", "id": id, "dir": pki[role], "endpoint": endpoint}


def _tls_destination(vms, pki, *extra: str):
    """A destination that requires TLS and client certificates with CLIENT_DN: --object on its command
    line, the authz object over QMP, the parameters, then migrate-incoming (QEMU's order)."""
    dst = vms(
        "dst", "--incoming", "defer", "--object", f"tls-creds-x509,id=tls0,dir={pki['server']},endpoint=server", *extra
    )
    d = dst.client()
    d.cmd("object-add", **{"qom-type": "authz-simple", "id": "auth0", "identity": CLIENT_DN})
    d.cmd("migrate-set-parameters", **{"tls-creds": "tls0", "tls-authz": "auth0"})
    d.cmd("migrate-incoming", uri="tcp:127.0.0.1:0")
    (addr,) = d.cmd("query-migrate")["socket-address"]
    return dst, d, f"tcp:127.0.0.1:{addr['port']}"


def test_tls_migration_with_page_channels_and_a_plain_source_refused(vms, pki):
    dst, d, uri = _tls_destination(vms, pki)
    src = vms("src", "--dirty-rate", "4M")
    s = src.client()
    Q.prepare(s, d, **{"max-bandwidth": Q.FAST, "multifd-channels": 2})
    s.cmd("migrate-set-capabilities", capabilities=[{"capability": "multifd", "state": True}])
    # A plain source: refused with the reason; its guest runs on; the destination waits on.
    s.cmd("migrate", uri=uri)
    info = Q.wait_status(s)
    assert info["status"] == "failed" and "requires TLS" in info["error-desc"], info
    assert s.cmd("query-status")["status"] == "running" and s.cmd("query-sev")["state"] == "running"
    assert d.cmd("query-migrate")["status"] == "setup" and d.cmd("query-status")["status"] == "inmigrate"
    # Now in TLS: the client credentials over QMP, every connection (main and 2 channels) in TLS.
    s.cmd("object-add", **_tls_object("client", pki, "client"))
    s.cmd("migrate-set-parameters", **{"tls-creds": "tls0"})
    params = s.cmd("query-migrate-parameters")
    assert (params["tls-creds"], params["tls-hostname"], params["tls-authz"]) == ("tls0", "", "")
    assert d.cmd("query-migrate-parameters")["tls-authz"] == "auth0"
    s.cmd("migrate", uri=uri)
    info = Q.wait_status(s)
    assert info["status"] == "completed", (info, src.log(), dst.log())
    assert info["ram"]["multifd-bytes"] > 0
    assert info["x-guest-digest"] == Q.wait_incoming(d)["x-guest-digest"]
    assert "in TLSv1.3 TLS_AES_" in src.log()
    # object-del: not while the parameters name it; then gone.
    Q.expect_error(s, "object-del", contains="object 'tls0' is in use, can not be deleted", id="tls0")
    s.cmd("migrate-set-parameters", **{"tls-creds": None})
    assert s.cmd("query-migrate-parameters")["tls-creds"] == ""
    s.cmd("object-del", id="tls0")
    Q.expect_error(s, "object-del", contains="object 'tls0' not found", id="tls0")
    s.close()
    d.close()


def test_tls_refusals_and_object_errors_over_qmp(vms, pki, tmp_path):
    dst, d, uri = _tls_destination(vms, pki)
    src = vms("src", "--object", f"tls-creds-x509,id=good,dir={pki['client']},endpoint=client,verify-peer=on")
    s = src.client()
    Q.prepare(s, d, **{"max-bandwidth": Q.FAST})
    # object-add and migrate-set-parameters errors, in QEMU's words.
    Q.expect_error(
        s,
        "object-add",
        contains="Unable to access credentials " + str(tmp_path),
        **_tls_object("x", {"x": str(tmp_path)}, "client"),
    )
    Q.expect_error(
        s,
        "object-add",
        contains="attempt to add duplicate property 'good'",
        **_tls_object("client", pki, "client", "good"),
    )
    Q.expect_error(
        s,
        "object-add",
        contains="does not accept value 'peer'",
        **{**_tls_object("client", pki, "client", "x"), "endpoint": "peer"},
    )
    Q.expect_error(
        s,
        "object-add",
        contains="Parameter 'identity' is unexpected",
        **{**_tls_object("client", pki, "client", "x"), "identity": "CN=x"},
    )
    Q.expect_error(
        s, "object-add", contains="Parameter 'identity' is missing", **{"qom-type": "authz-simple", "id": "a"}
    )
    Q.expect_error(
        s,
        "object-add",
        contains="Parameter 'id' expects an identifier",
        **{"qom-type": "authz-simple", "id": "1a", "identity": "x"},
    )
    Q.expect_error(s, "migrate-set-parameters", contains="No TLS credentials with id 'nope'", **{"tls-creds": "nope"})
    s.cmd("object-add", **{"qom-type": "authz-simple", "id": "auth0", "identity": "CN=x"})
    Q.expect_error(
        s, "migrate-set-parameters", contains="Object with id 'auth0' is not TLS credentials", **{"tls-creds": "auth0"}
    )
    s.cmd("object-add", **_tls_object("server", pki, "server", "srv"))
    s.cmd("migrate-set-parameters", **{"tls-creds": "srv"})
    Q.expect_error(s, "migrate", contains="Expected TLS credentials for a client endpoint", uri=uri)
    d.cmd("object-add", **_tls_object("client", pki, "client", "cli"))
    Q.expect_error(
        d, "migrate-set-parameters", contains="Expected TLS credentials for a server endpoint", **{"tls-creds": "cli"}
    )
    Q.expect_error(
        d, "migrate-set-parameters", contains="No authorization object with id 'nope'", **{"tls-authz": "nope"}
    )
    assert d.cmd("query-migrate-parameters")["tls-creds"] == "tls0"  # unchanged by the refused updates
    # Each refused attempt fails on the source with the reason; the guest runs on, the destination waits.
    cases = [
        ("client-wrong-ca", "", "certificate verify failed: self-signed certificate in certificate chain"),
        ("client", "wrong.pysev.test", "Hostname mismatch"),
        ("client-rogue", "", "alert unknown ca"),
        ("client-other", "", "TLS x509 authz check for CN=intruder.pysev.test,O=pysev\\, tests,C=GB is denied"),
    ]
    for i, (role, hostname, expected) in enumerate(cases):
        s.cmd("object-add", **_tls_object(role, pki, "client", f"c{i}"))
        s.cmd("migrate-set-parameters", **{"tls-creds": f"c{i}", "tls-hostname": hostname})
        s.cmd("migrate", uri=uri)
        info = Q.wait_status(s)
        assert info["status"] == "failed" and expected in info["error-desc"], (role, info)
        assert s.cmd("query-status")["status"] == "running"
    assert d.cmd("query-migrate")["status"] == "setup" and d.cmd("query-status")["status"] == "inmigrate"
    s.close()
    d.close()


def test_vm_object_option_errors():
    for option, message in [
        (
            "tls-creds-x509,id=t,dir=/nonexistent,endpoint=server",
            "Unable to access credentials /nonexistent/ca-cert.pem",
        ),
        ("tls-creds-x509,id=t,dir=/x,verify-peer=maybe", "Parameter 'verify-peer' expects 'on' or 'off'"),
        ("secret,id=s,data=x", "Parameter 'qom-type' does not accept value 'secret'"),
    ]:
        res = subprocess.run(
            [sys.executable, "-m", "pysev.cli", "vm", "--memory", "16M", "--qmp", "/nonexistent/q", "--object", option],
            capture_output=True,
            text=True,
            env=Q._env(),
            timeout=60,
        )
        assert res.returncode == 2 and message in res.stderr, (option, res.stderr)


class TlsRecordCorrupter(Q.Relay):
    """Flips one bit in the middle of the first large application-data record (the first stream bytes
    that carry pages) of the first connection's forward stream, following the TLS record framing."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.flipped = False
        self._head = bytearray()
        self._left = 0  # bytes of the current record's body still to come
        self._flip_at: int | None = None  # offset of the bit to flip, counted down with _left
        super().__init__(target)

    def forward(self, data: bytes, out: socket.socket, forward: bool, connection: int, seen: int) -> None:
        if not forward or connection != 0 or self.flipped:
            out.sendall(data)
            return
        buf, i = bytearray(data), 0
        while i < len(buf):
            if self._left == 0:
                take = min(5 - len(self._head), len(buf) - i)
                self._head += buf[i : i + take]
                i += take
                if len(self._head) == 5:
                    kind, length = self._head[0], int.from_bytes(self._head[3:5], "big")
                    self._left = length
                    self._flip_at = length // 2 if kind == APP_DATA and length >= 4096 else None
                    self._head.clear()
                continue
            take = min(self._left, len(buf) - i)
            if self._flip_at is not None and self._flip_at < take:
                buf[i + self._flip_at] ^= 0x01
                self.flipped, self._flip_at = True, None
            elif self._flip_at is not None:
                self._flip_at -= take
            self._left -= take
            i += take
        out.sendall(bytes(buf))


def test_tls_bit_flip_in_transit_fails_before_any_page(vms, pki):
    """In TLS a flipped bit fails the record's authentication: the destination stops at that record,
    before any page reaches the firmware, and the source's guest runs on."""
    dst, d, uri = _tls_destination(vms, pki)
    src = vms("src", "--object", f"tls-creds-x509,id=tls0,dir={pki['client']},endpoint=client")
    s = src.client()
    Q.prepare(s, d, **{"max-bandwidth": Q.FAST, "tls-creds": "tls0", "tls-hostname": "localhost"})
    relay = TlsRecordCorrupter(("127.0.0.1", int(uri.rsplit(":", 1)[1])))
    try:
        s.cmd("migrate", uri=relay.uri)
        info = Q.wait_status(s)
    finally:
        relay.close()
    assert relay.flipped
    # The destination's alert is the source's reason when the source reads it before the connection
    # closes; otherwise the source sees the TLS connection end (a race): a TLS failure either way.
    assert info["status"] == "failed" and "TLS" in info["error-desc"], info
    assert "alert bad record mac" in info["error-desc"] or "EOF occurred" in info["error-desc"], info
    assert "x-guest-digest" not in info
    assert s.cmd("query-status")["status"] == "running" and s.cmd("query-sev")["state"] == "running"
    dinfo = Q.wait_status(d, done=("failed",), timeout=20)
    assert "a record failed authentication" in dinfo["error-desc"] and "altered in transit" in dinfo["error-desc"]
    assert dinfo["sev"] == {"pages-encrypted": 0, "pages-shared": 0}, dinfo  # nothing reached the guest
    assert d.cmd("query-status")["status"] == "inmigrate"
    s.close()
    d.close()


class CommitCutter(Q.Relay):
    """Cuts the first connection once the destination has answered the stream (RECEIVED, its first
    record after the stream): the source's COMMIT is lost. Notes how later connections begin."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.s2d = 0
        self.cut = False
        self.first_bytes: dict[int, bytes] = {}
        super().__init__(target)

    def forward(self, data: bytes, out: socket.socket, forward: bool, connection: int, seen: int) -> None:
        if forward and seen == 0:
            self.first_bytes[connection] = data[:2]
        if connection == 0 and forward:
            if self.cut:
                raise OSError("cut")  # the pump shuts both ends down
            self.s2d += len(data)
        elif connection == 0 and self.s2d > (1 << 20):
            self.cut = True  # before RECEIVED leaves: the COMMIT it triggers never arrives
        out.sendall(data)


def test_tls_commit_delivered_again_on_a_tls_resume_connection(vms, pki):
    dst, d, uri = _tls_destination(vms, pki)
    src = vms("src", "--object", f"tls-creds-x509,id=tls0,dir={pki['client']},endpoint=client")
    s = src.client()
    Q.prepare(s, d, **{"max-bandwidth": Q.FAST, "tls-creds": "tls0"})
    relay = CommitCutter(("127.0.0.1", int(uri.rsplit(":", 1)[1])))
    try:
        s.cmd("migrate", uri=relay.uri)
        info = Q.wait_status(s)
    finally:
        relay.close()
    assert relay.cut
    assert info["status"] == "completed", (info, src.log(), dst.log())
    assert info["x-guest-digest"] == Q.wait_incoming(d)["x-guest-digest"]
    # The resume connection(s) after the main one began with a TLS ClientHello.
    assert len(relay.first_bytes) >= 2 and all(b == b"\x16\x03" for b in relay.first_bytes.values()), relay.first_bytes
    s.close()
    d.close()

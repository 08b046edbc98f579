"""A throwaway certificate authority for the tests' TLS servers: a CA of its own and a server certificate it
signed, as PEM files in a directory, valid for a day. Clients verify them for real (chain and host name)."""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class TlsFiles:
    """A throwaway CA and a server certificate it signed (``make_tls_files``), as PEM files."""

    ca: Path
    cert: Path
    key: Path

    def server_settings(self) -> dict[str, str]:
        return {"tls-cert-file": str(self.cert), "tls-key-file": str(self.key), "tls-ca-cert-file": str(self.ca),
                "tls-auth-clients": "no"}  # fmt: skip


def make_tls_files(directory: Path, host: str = "127.0.0.1") -> TlsFiles:
    """A CA of its own (valid for a day) and a certificate for ``host`` (and localhost) signed by it, in
    ``directory``: what a test needs to run a server over TLS that clients verify for real."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)

    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"botworker throwaway CA {now:%H%M%S.%f}")])

    def build(subject: str, key: ec.EllipticCurvePrivateKey, signer: ec.EllipticCurvePrivateKey, ca: bool
              ) -> x509.Certificate:  # fmt: skip
        builder = (
            x509.CertificateBuilder()
            .subject_name(ca_name if ca else x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
            .issuer_name(ca_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if ca:
            usage = x509.KeyUsage(False, False, False, False, False, True, True, False, False)
            builder = builder.add_extension(usage, critical=True)
        else:
            names = [x509.DNSName("localhost")]
            try:
                names.append(x509.IPAddress(ipaddress.ip_address(host)))
            except ValueError:
                names.append(x509.DNSName(host))
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        return builder.sign(signer, hashes.SHA256())

    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_cert = build("", ca_key, ca_key, ca=True)  # self-signed
    cert = build(host, key, ca_key, ca=False)
    files = TlsFiles(directory / "ca.pem", directory / "server.pem", directory / "server.key")
    files.ca.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    files.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    files.key.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    files.key.chmod(0o644)  # a throwaway key, read by a server that may run as another user
    return files

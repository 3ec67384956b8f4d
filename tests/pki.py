"""A throwaway certificate authority and leaf certificates made with openssl, for TLS tests."""

from __future__ import annotations

import subprocess
from pathlib import Path

NAMES = "IP:127.0.0.1,DNS:localhost,DNS:media.test"
"""What the leaf certificates are valid for (``media.test`` resolves only through a test's resolver)."""


def _run(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True)


def make_pki(d: Path, leaves: tuple[str, ...] = ("server", "client")) -> Path:
    """``d/ca.pem`` + ``d/ca.key`` and, per leaf, ``d/<leaf>.pem`` + ``d/<leaf>.key`` signed by it."""
    _run("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=test-ca",
         "-keyout", str(d / "ca.key"), "-out", str(d / "ca.pem"))
    for name in leaves:
        _run("openssl", "req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}",
             "-keyout", str(d / f"{name}.key"), "-out", str(d / f"{name}.csr"))
        ext = d / f"{name}.ext"
        ext.write_text(f"subjectAltName={NAMES}\n")
        _run("openssl", "x509", "-req", "-in", str(d / f"{name}.csr"), "-CA", str(d / "ca.pem"),
             "-CAkey", str(d / "ca.key"), "-CAcreateserial", "-days", "1", "-extfile", str(ext),
             "-out", str(d / f"{name}.pem"))
    return d

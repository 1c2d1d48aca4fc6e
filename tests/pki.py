"""Certificates for the TLS tests: trustme makes real ones; this adds the encrypted key it does not."""

from __future__ import annotations

import trustme
from cryptography.hazmat.primitives import serialization


def encrypted_key(leaf: trustme.LeafCert, password: str) -> bytes:
    """``leaf``'s private key as encrypted PKCS#8 PEM (``BEGIN ENCRYPTED PRIVATE KEY``), the form a
    key with a password usually has, and the only one KEDA's scaler opens."""
    key = serialization.load_pem_private_key(leaf.private_key_pem.bytes(), password=None)
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(password.encode()),
    )

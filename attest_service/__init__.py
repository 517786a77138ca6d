"""attest-service: verify Azure Instance Metadata Service attested documents, once per nonce."""

__version__ = "0.1.0"

"""Tests of the VM side: PKI and signer, IMDS emulator, attest client."""

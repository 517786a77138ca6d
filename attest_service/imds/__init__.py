"""The VM side of attestation: an Azure-shaped PKI and document signer, an IMDS emulator, and the client.

* :mod:`attest_service.imds.pki` builds certificates and attested documents shaped exactly like Azure's
  (for test fixtures and for the emulator).
* :mod:`attest_service.imds.emulator` serves a local stand-in for the Instance Metadata Service.
* :mod:`attest_service.imds.client` is the library a vendor embeds in its VM image: challenge, fetch from
  IMDS, submit for verification.
"""

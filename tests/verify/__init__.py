"""Tests of the verification core: generated cases, real documents, properties."""

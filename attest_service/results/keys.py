"""The result-signing keys: a directory of PEM private keys, loaded, checked and published by thumbprint.

``ATTEST_RESULT_KEYS`` names a directory; every non-hidden ``*.pem`` file in it is one private key:

- an EC P-256 key signs with ES256, an RSA key of 2048 bits or more with RS256, an Ed25519 key with EdDSA;
  anything else (another curve, a short RSA key, Ed448, DSA, an encrypted or unreadable file) is refused
  with a message naming the file, never its content;
- a file that others may read, write or run, or that its group may write, is refused: whoever reads it
  can sign results in the service's name. A file its group may read is refused as well, unless that group is
  the one the service runs as (Kubernetes gives a mounted Secret's files the pod's ``fsGroup`` and adds group
  read whatever ``defaultMode`` says; only the service's own processes are in that group);
- the key whose file name sorts last (Python's string order) signs; every key is published in the JWK Set
  with ``kid`` = its RFC 7638 SHA-256 thumbprint, so a relying party keeps verifying results signed by a
  key that is about to be retired, and learns a new key before it signs anything.

:func:`write_new_key` is ``attest-service keys new``; :func:`ensure_generated_key` makes the embedded default
(one P-256 key, generated once beside the SQLite store and kept).
"""

from __future__ import annotations

import os
import secrets
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Final, Literal

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from joserfc.jwk import ECKey, OKPKey, RSAKey

from attest_service.errors import ConfigurationError

Algorithm = Literal["ES256", "RS256", "EdDSA"]
#: The algorithms a key may have, in the order ``keys new --algorithm`` lists them.
ALGORITHMS: Final[tuple[Algorithm, ...]] = ("ES256", "RS256", "EdDSA")
#: The smallest RSA key accepted (NIST SP 800-57: 2048 bits for use beyond 2030 is the floor).
MIN_RSA_BITS: Final = 2048
#: The RSA size ``keys new --algorithm RS256`` generates.
NEW_RSA_BITS: Final = 3072
#: Largest key file read: a 16384-bit RSA key in PEM is under 13 KiB.
MAX_KEY_BYTES: Final = 64 * 1024
#: Most key files in the directory: rotation needs two or three; more is a wrong path.
MAX_KEYS: Final = 64
#: The file the embedded default key is written to; ``keys new`` names sort after it ("key-..." > "generated").
GENERATED_KEY_NAME: Final = "generated.pem"
#: The suffix of key files; other files in the directory are not keys and are passed over.
KEY_SUFFIX: Final = ".pem"

#: What the reload compares: each key file's name, type, size, device, inode, change and modification times.
KeyFingerprint = tuple[tuple[str, int, int, int, int, int, int], ...]

_PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey
JoseKey = ECKey | RSAKey | OKPKey


@dataclass(frozen=True, slots=True)
class SigningKey:
    """One private key of the directory: its file name, its ``kid`` (RFC 7638 thumbprint) and its ``alg``.

    The private part never leaves this object but to sign: :meth:`public_jwk` is what is published, and
    the object's ``repr`` names the key by file and ``kid`` only.
    """

    name: str
    kid: str
    alg: Algorithm
    jose_key: JoseKey

    def __repr__(self) -> str:
        return f"SigningKey(name={self.name!r}, kid={self.kid!r}, alg={self.alg!r})"

    def public_jwk(self) -> dict[str, object]:
        """The public JWK: the key's public members, ``kid``, ``alg`` and ``use: "sig"``."""
        public = dict(self.jose_key.as_dict(private=False))
        # as_dict(private=False) gives the public members only; keep exactly those a public JWK has.
        for member in ("d", "p", "q", "dp", "dq", "qi", "oth"):
            public.pop(member, None)
        return {**public, "kid": self.kid, "alg": self.alg, "use": "sig"}


@dataclass(frozen=True, slots=True)
class KeySet:
    """The keys of one load of the directory, in file-name order; the last one signs."""

    keys: tuple[SigningKey, ...]

    @property
    def signing(self) -> SigningKey:
        """The key that signs: the one whose file name sorts last."""
        return self.keys[-1]

    def jwks(self) -> dict[str, object]:
        """The JWK Set of every key's public part (each ``kid`` once)."""
        seen: set[str] = set()
        published: list[dict[str, object]] = []
        for key in self.keys:
            if key.kid not in seen:
                seen.add(key.kid)
                published.append(key.public_jwk())
        return {"keys": published}


def _algorithm(private: object, name: str) -> tuple[Algorithm, JoseKey]:
    if isinstance(private, ec.EllipticCurvePrivateKey):
        if not isinstance(private.curve, ec.SECP256R1):
            raise ConfigurationError(f"ATTEST_RESULT_KEYS: {name} is an EC key on {private.curve.name}; "
                                     "only P-256 (ES256) is supported")
        return "ES256", ECKey(private, private)
    if isinstance(private, rsa.RSAPrivateKey):
        if private.key_size < MIN_RSA_BITS:
            raise ConfigurationError(f"ATTEST_RESULT_KEYS: {name} is a {private.key_size}-bit RSA key; "
                                     f"RS256 needs at least {MIN_RSA_BITS} bits")
        return "RS256", RSAKey(private, private)
    if isinstance(private, ed25519.Ed25519PrivateKey):
        return "EdDSA", OKPKey(private, private)
    raise ConfigurationError(f"ATTEST_RESULT_KEYS: {name} is a {type(private).__name__.lstrip('_')}; expected an "
                             "EC P-256 (ES256), RSA of 2048 bits or more (RS256) or Ed25519 (EdDSA) private key")


def _check_mode(info: os.stat_result, name: str) -> None:
    mode = stat.S_IMODE(info.st_mode)
    group_read_allowed = info.st_gid == os.getegid()
    forbidden = 0o077 & ~(0o040 if group_read_allowed else 0)
    if mode & forbidden:
        raise ConfigurationError(f"ATTEST_RESULT_KEYS: {name} has mode {mode:04o}: a signing key must be readable "
                                 f"by its owner only (chmod 600 {name})")


def read_key(path: Path) -> SigningKey:
    """Load one key file; raise ConfigurationError naming the file (never its content) when it is unusable."""
    name = path.name
    try:
        # O_NONBLOCK: a FIFO under a key's name must not hang the loader; fstat then refuses it.
        descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        with os.fdopen(descriptor, "rb") as handle:
            info = os.fstat(handle.fileno())
            if not stat.S_ISREG(info.st_mode):
                raise ConfigurationError(f"ATTEST_RESULT_KEYS: {name} is not a regular file")
            _check_mode(info, name)
            data = handle.read(MAX_KEY_BYTES + 1)
    except OSError as exc:
        raise ConfigurationError(f"ATTEST_RESULT_KEYS: cannot read {name} ({exc.strerror})") from None
    if len(data) > MAX_KEY_BYTES:
        raise ConfigurationError(f"ATTEST_RESULT_KEYS: {name} is larger than {MAX_KEY_BYTES} bytes")
    try:
        private = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        # The library's message is not repeated: nothing of the file's content may reach a log.
        raise ConfigurationError(f"ATTEST_RESULT_KEYS: {name} is not an unencrypted PEM private key") from None
    alg, jose_key = _algorithm(private, name)
    return SigningKey(name=name, kid=jose_key.thumbprint(), alg=alg, jose_key=jose_key)


def _key_files(directory: Path) -> Iterator[Path]:
    try:
        names = sorted(entry.name for entry in os.scandir(directory))
    except OSError as exc:
        raise ConfigurationError(f"ATTEST_RESULT_KEYS: cannot list {directory} ({exc.strerror})") from None
    # Hidden entries are editors' and Kubernetes' (a mounted Secret's ..data and timestamped folders).
    for name in names:
        if not name.startswith(".") and name.endswith(KEY_SUFFIX):
            yield directory / name


def load_keys(directory: Path) -> KeySet:
    """Every key of ``directory``; raise ConfigurationError when one is unusable or there is none."""
    if not directory.is_dir():
        raise ConfigurationError(f"ATTEST_RESULT_KEYS: {directory} is not a directory")
    paths = list(_key_files(directory))
    if not paths:
        raise ConfigurationError(f"ATTEST_RESULT_KEYS: {directory} holds no *{KEY_SUFFIX} key")
    if len(paths) > MAX_KEYS:
        raise ConfigurationError(f"ATTEST_RESULT_KEYS: {directory} holds more than {MAX_KEYS} keys")
    return KeySet(tuple(read_key(path) for path in paths))


def key_fingerprint(directory: Path) -> KeyFingerprint:
    """What :func:`load_keys` would read, as metadata: a change of any key file (or the set of them) shows.

    Like the pinned directory's fingerprint: type, size, device, inode, modification and change time of each
    key file through symbolic links, and each link's target, so in-place writes, ``os.replace`` and the
    symlink swap of a mounted Kubernetes Secret are all seen. Raises ConfigurationError when the directory
    cannot be listed.
    """
    entries: list[tuple[str, int, int, int, int, int, int]] = []
    for path in _key_files(directory):
        try:
            target = str(path.readlink()) if path.is_symlink() else ""
            info = path.stat()
        except OSError:
            entries.append((f"{path.name} -> ?", -1, -1, -1, -1, -1, -1))
            continue
        entries.append((f"{path.name} -> {target}", stat.S_IFMT(info.st_mode), info.st_size, info.st_dev,
                        info.st_ino, info.st_mtime_ns, info.st_ctime_ns))
    return tuple(entries)


def generate_private_key(algorithm: Algorithm) -> _PrivateKey:
    """A new private key for ``algorithm``."""
    if algorithm == "ES256":
        return ec.generate_private_key(ec.SECP256R1())
    if algorithm == "RS256":
        return rsa.generate_private_key(public_exponent=65537, key_size=NEW_RSA_BITS)
    if algorithm == "EdDSA":
        return ed25519.Ed25519PrivateKey.generate()
    raise ConfigurationError(f"unknown algorithm {algorithm!r}: expected one of {', '.join(ALGORITHMS)}")


def _pem(private: _PrivateKey) -> bytes:
    return private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                 serialization.NoEncryption())


def _write_exclusive(directory: Path, name: str, data: bytes) -> bool:
    """Write ``data`` to ``directory/name`` (mode 0600) whole or not at all; False when the name is taken.

    The key is written to a hidden temporary file first and linked to its name (``link`` never replaces an
    existing file): a reader never sees a half-written key, and two processes racing for the name cannot
    both win or overwrite each other.
    """
    temporary = directory / f".{name}.{secrets.token_hex(8)}.tmp"
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        try:
            os.link(temporary, directory / name)
        except FileExistsError:
            return False
        return True
    finally:
        temporary.unlink(missing_ok=True)


def _new_name(directory: Path, now: datetime) -> str:
    candidate = f"key-{now.astimezone(UTC).strftime('%Y%m%dT%H%M%S%fZ')}{KEY_SUFFIX}"
    existing = [path.name for path in _key_files(directory)]
    last = max(existing, default="")
    if candidate > last:
        return candidate
    # A hand-named key sorts after ours: extend its stem, "_" sorting after the "." of its suffix.
    return f"{last.removesuffix(KEY_SUFFIX)}_{candidate}"


def write_new_key(directory: Path, algorithm: Algorithm = "ES256", *, now: datetime | None = None) -> SigningKey:
    """``keys new``: write a new key (mode 0600) to ``directory``, named to sort after its keys; return it.

    The directory is created (mode 0700) when missing. Raises ConfigurationError when it cannot be written.
    """
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        pem = _pem(generate_private_key(algorithm))
        for _ in range(3):
            name = _new_name(directory, now if now is not None else datetime.now(UTC))
            if _write_exclusive(directory, name, pem):
                return read_key(directory / name)
    except OSError as exc:
        raise ConfigurationError(f"cannot write a key to {directory} ({exc.strerror})") from None
    raise ConfigurationError(f"cannot find a free key name in {directory}")


def ensure_generated_key(directory: Path) -> bool:
    """The embedded default: when ``directory`` holds no key, generate one P-256 key there; True if it did.

    Safe to call from several processes at once: exactly one key is kept (see :func:`_write_exclusive`).
    Raises ConfigurationError when the directory cannot be created or written.
    """
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        if any(True for _ in _key_files(directory)):
            return False
        return _write_exclusive(directory, GENERATED_KEY_NAME, _pem(generate_private_key("ES256")))
    except OSError as exc:
        raise ConfigurationError(f"ATTEST_RESULT_KEYS: cannot create the default key in {directory} "
                                 f"({exc.strerror})") from None

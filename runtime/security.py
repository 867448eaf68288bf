"""Keys, authentication and the bundle's signature.

Two separate jobs, both on libsodium (through pyzmq and PyNaCl), no home-made crypto:

* **Links: ZeroMQ CURVE**, the "ironhouse" pattern of pyzmq's ``zmq.auth``. The
  central node is the CURVE server on both of its sockets. A ZAP handler
  (:class:`zmq.auth.thread.ThreadAuthenticator`) admits on the worker socket
  only the public keys in its ``devices/`` folder and on the client socket only
  those in ``clients/``; everything else is refused in the handshake, so a
  stranger's bytes never reach the decoder. Workers and clients pin the central
  node's public key. The central node also checks that a worker speaks under
  the name its key was issued for (ZAP's ``User-Id`` is the z85 public key), so
  one device's key cannot answer for another device.
* **The bundle: an Ed25519 signature** over ``manifest.json`` (which lists the
  SHA-256 of every artifact, so the signature covers them all), in
  ``manifest.sig``. Every role given the operator's verify key refuses a bundle
  whose manifest was edited: a label, a preprocessing value, a checksum together
  with its file.

One call, ``coformer-runtime keys OUT --bundle BUNDLE``, writes one folder per
role, each ready to copy to its machine::

    OUT/operator/     operator.signing (secret: stays with whoever compiles), operator.pub
    OUT/central/      central.key_secret, central.key, devices/DEV.key, clients/NAME.key, operator.pub
    OUT/DEV/          DEV.key_secret, DEV.key, central.key, operator.pub     (one per worker)
    OUT/clients/NAME/ NAME.key_secret, NAME.key, central.key, operator.pub

and signs the bundle. Existing keys are kept (re-running after a recompile only
signs again and adds what is missing).

Secure is the default: a role whose endpoint is not loopback needs ``--keys``,
or ``--insecure`` to run plain TCP, which it logs as a warning.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional
from urllib.parse import urlsplit

from coformer.runtime.files import MANIFEST_NAME, atomic_write_bytes
from coformer.runtime.errors import CoFormerError

log = logging.getLogger("coformer.security")

SIGNATURE_NAME = "manifest.sig"
OPERATOR_PUBLIC = "operator.pub"
OPERATOR_SECRET = "operator.signing"
CENTRAL = "central"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


# -- endpoints -------------------------------------------------------------------
def is_loopback(endpoint: str) -> bool:
    """True for ``ipc://``/``inproc://`` and ``tcp://`` on 127.0.0.0/8, ::1 or localhost.
    A wildcard bind (``tcp://*:5555``, ``0.0.0.0``) is every interface: not loopback."""
    scheme, _, rest = endpoint.partition("://")
    if scheme in ("ipc", "inproc"):
        return True
    host = urlsplit(f"//{rest}").hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # '*', an interface name or a host name: assume it reaches the network


def require_security(keys: Optional["RoleKeys"], insecure: bool, endpoints: Iterable[str], role: str) -> bool:
    """Whether this role runs CURVE. Without keys, only loopback endpoints are served in
    plain TCP unless ``insecure`` says so explicitly (and then the log says so)."""
    if keys is not None:
        if insecure:
            raise CoFormerError(f"{role}: --keys and --insecure contradict each other; drop one")
        return True
    off = [e for e in endpoints if not is_loopback(e)]
    if off and not insecure:
        raise CoFormerError(f"{role}: endpoint {off[0]} is not loopback, so its links must be authenticated: "
                            "give --keys FOLDER (from `coformer-runtime keys`), or --insecure to run plain TCP")
    if off:
        log.warning("%s: INSECURE: plain TCP on %s; any peer that reaches it can send and read messages",
                    role, ", ".join(off))
    return False


# -- key folders -----------------------------------------------------------------
@dataclass(frozen=True)
class RoleKeys:
    """One role's key folder, as :func:`write_keys` lays it out."""

    folder: Path
    name: str
    public: bytes  # z85, as zmq takes them
    secret: bytes
    server: Optional[bytes] = None  # the central node's public key (workers, clients)
    operator: Optional[bytes] = None  # Ed25519 verify key (raw 32 bytes)
    devices: dict = field(default_factory=dict)  # central: worker name -> z85 public key

    @property
    def devices_dir(self) -> Path:
        return self.folder / "devices"

    @property
    def clients_dir(self) -> Path:
        return self.folder / "clients"


def load_keys(folder: Path, role: str) -> RoleKeys:
    """Read a role folder (``role`` is ``central``, ``worker`` or ``client``); errors name the file."""
    import zmq.auth

    folder = Path(folder)
    if not folder.is_dir():
        raise CoFormerError(f"key folder {folder} does not exist (write one with `coformer-runtime keys`)")
    secrets = sorted(folder.glob("*.key_secret"))
    if len(secrets) != 1:
        raise CoFormerError(f"key folder {folder} must hold exactly one *.key_secret (this role's key), "
                            f"found {[p.name for p in secrets]}")
    try:
        public, secret = zmq.auth.load_certificate(secrets[0])
    except (OSError, ValueError) as e:
        raise CoFormerError(f"{secrets[0]} is not a ZeroMQ key file: {e}") from None
    if secret is None:
        raise CoFormerError(f"{secrets[0]} holds no secret key")
    name = secrets[0].name[: -len(".key_secret")]
    operator = _read_verify_key(folder / OPERATOR_PUBLIC)
    if role == "central":
        devices = {}
        for p in sorted((folder / "devices").glob("*.key")):
            devices[p.name[:-4]] = _public_of(p)
        if not (folder / "clients").is_dir():
            raise CoFormerError(f"central key folder {folder} has no clients/ folder of allowed client keys")
        return RoleKeys(folder, name, public, secret, operator=operator, devices=devices)
    server_file = folder / f"{CENTRAL}.key"
    if not server_file.is_file():
        raise CoFormerError(f"key folder {folder} has no {CENTRAL}.key (the central node's public key)")
    return RoleKeys(folder, name, public, secret, server=_public_of(server_file), operator=operator)


def _public_of(path: Path) -> bytes:
    import zmq.auth

    try:
        return zmq.auth.load_certificate(path)[0]
    except (OSError, ValueError) as e:
        raise CoFormerError(f"{path} is not a ZeroMQ public key file: {e}") from None


def _read_verify_key(path: Path) -> Optional[bytes]:
    if not path.is_file():
        return None
    raw = path.read_bytes().strip()
    try:
        key = bytes.fromhex(raw.decode())
    except (UnicodeDecodeError, ValueError):
        key = b""
    if len(key) != 32:
        raise CoFormerError(f"{path} is not an Ed25519 verify key (64 hex digits)")
    return key


def _check_name(name: str, what: str) -> str:
    if not _NAME.match(name) or name in (CENTRAL, "clients", "operator", "devices"):
        raise CoFormerError(f"{what} {name!r} cannot name a key: use letters, digits, '.', '_' or '-', "
                            "and not central, clients, devices or operator")
    return name


def _new_curve_pair(folder: Path, name: str) -> tuple[Path, Path]:
    """A CURVE pair ``name.key`` / ``name.key_secret`` in ``folder``; an existing pair is kept."""
    import zmq.auth

    folder.mkdir(parents=True, exist_ok=True)
    pub, sec = folder / f"{name}.key", folder / f"{name}.key_secret"
    if not sec.is_file():
        # written in a temporary folder and moved: never a half-written secret
        tmp = folder / f".{name}.new"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        p, s = zmq.auth.create_certificates(tmp, name)
        Path(s).chmod(0o600)
        Path(p).replace(pub)
        Path(s).replace(sec)
        tmp.rmdir()
    return pub, sec


def write_keys(out: Path, workers: Iterable[str], clients: Iterable[str]) -> dict[str, Path]:
    """Write (or complete) the role folders under ``out``; returns role -> folder."""
    from nacl.signing import SigningKey

    out = Path(out)
    workers = [_check_name(w, "device") for w in workers]
    clients = [_check_name(c, "client") for c in clients] or ["client"]
    op_dir = out / "operator"
    op_dir.mkdir(parents=True, exist_ok=True)
    op_secret = op_dir / OPERATOR_SECRET
    if not op_secret.is_file():
        atomic_write_bytes(op_secret, SigningKey.generate().encode().hex().encode() + b"\n")
        op_secret.chmod(0o600)
    signing = _read_signing_key(op_secret)
    verify = signing.verify_key.encode().hex().encode() + b"\n"
    atomic_write_bytes(op_dir / OPERATOR_PUBLIC, verify)

    folders = {"operator": op_dir}
    c_dir = out / CENTRAL
    c_pub, _ = _new_curve_pair(c_dir, CENTRAL)
    (c_dir / "devices").mkdir(exist_ok=True)
    (c_dir / "clients").mkdir(exist_ok=True)
    atomic_write_bytes(c_dir / OPERATOR_PUBLIC, verify)
    folders[CENTRAL] = c_dir
    for name, folder, allowed in ([(w, out / w, "devices") for w in workers]
                                  + [(c, out / "clients" / c, "clients") for c in clients]):
        pub, _ = _new_curve_pair(folder, name)
        shutil.copyfile(c_pub, folder / f"{CENTRAL}.key")
        atomic_write_bytes(folder / OPERATOR_PUBLIC, verify)
        shutil.copyfile(pub, c_dir / allowed / f"{name}.key")
        folders[name if allowed == "devices" else f"clients/{name}"] = folder
    return folders


def _read_signing_key(path: Path):
    from nacl.signing import SigningKey

    try:
        raw = bytes.fromhex(Path(path).read_text().strip())
        return SigningKey(raw)
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise CoFormerError(f"{path} is not an Ed25519 signing key (64 hex digits): {e}") from None


# -- this user's own operator key -------------------------------------------------
LOCAL_OPERATOR_ENV = "COFORMER_CONFIG_DIR"


def local_operator_dir() -> Path:
    """Where this user's operator key lives: ``$COFORMER_CONFIG_DIR/operator`` (default
    ``$XDG_CONFIG_HOME/coformer/operator``, or ``~/.config/coformer/operator``)."""
    base = os.environ.get(LOCAL_OPERATOR_ENV) or os.path.join(
        os.environ.get("XDG_CONFIG_HOME") or os.path.expanduser("~/.config"), "coformer")
    return Path(base) / "operator"


def local_operator(create: bool = False) -> Optional[tuple[Path, bytes]]:
    """This user's operator key: ``(signing key file, verify key)``, made on first use when
    ``create`` (None when there is none and ``create`` is off).

    Every bundle this user compiles is signed with it (:class:`coformer.compiler.bundle.StagedBundle`),
    and ``coformer serve`` without ``--keys`` checks the signature against it, so an edited label,
    preprocessing or checksum is refused there too (issue 39, finding 6). Two processes making it
    at once keep one key: the file is created exclusively (a hard link, which never overwrites)."""
    from nacl.signing import SigningKey

    folder = local_operator_dir()
    secret = folder / OPERATOR_SECRET
    if not secret.is_file():
        if not create:
            return None
        folder.mkdir(parents=True, exist_ok=True)
        folder.chmod(0o700)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".operator-")
        try:
            os.fchmod(fd, 0o600)
            os.write(fd, SigningKey.generate().encode().hex().encode() + b"\n")
            os.close(fd)
            try:
                os.link(tmp, secret)  # fails if another process made it first: theirs is kept
            except FileExistsError:
                pass
        finally:
            os.unlink(tmp)
    key = _read_signing_key(secret)
    return secret, key.verify_key.encode()


def check_local_signature(bundle_dir: Path) -> Optional[tuple[Path, bytes]]:
    """Without an operator's keys, a bundle must carry this user's own signature (every compile
    here makes one: :func:`local_operator`), so an edited manifest is refused as it would be under
    ``--keys``; returns that key, or None where this user has none (nothing to check against).
    The refusal names the command that signs the bundle here, for one the user trusts."""
    local = local_operator()
    if local is not None:
        try:
            verify_signature(bundle_dir, local[1])
        except CoFormerError as e:
            raise CoFormerError(f"{e}. Without --keys, the signature is checked against this user's operator "
                                f"key ({local[0]}), which every compile here signs with; a bundle from "
                                f"elsewhere: serve it with that operator's --keys, or sign it here if you trust "
                                f"it: coformer-runtime sign {bundle_dir} --key {local[0]}") from None
    return local


# -- the bundle's signature ------------------------------------------------------
def sign_bundle(bundle_dir: Path, signing_key: Path) -> Path:
    """Sign ``manifest.json`` with the operator's Ed25519 key; writes ``manifest.sig``."""

    bundle_dir = Path(bundle_dir)
    manifest = bundle_dir / MANIFEST_NAME
    if not manifest.is_file():
        raise CoFormerError(f"{bundle_dir} is not a CoFormer bundle: no {MANIFEST_NAME} in it")
    key = _read_signing_key(Path(signing_key))
    signature = key.sign(manifest.read_bytes()).signature
    out = bundle_dir / SIGNATURE_NAME
    atomic_write_bytes(out, signature.hex().encode() + b"\n")
    return out


def verify_signature(bundle_dir: Path, verify_key: bytes) -> None:
    """Refuse a bundle whose ``manifest.json`` is not the one the operator signed."""
    from nacl.exceptions import BadSignatureError
    from nacl.signing import VerifyKey


    bundle_dir = Path(bundle_dir)
    sig_file = bundle_dir / SIGNATURE_NAME
    if not sig_file.is_file():
        raise CoFormerError(f"bundle {bundle_dir} is not signed (no {SIGNATURE_NAME}); sign it with "
                            "`coformer-runtime sign BUNDLE --key operator/operator.signing`")
    try:
        signature = bytes.fromhex(sig_file.read_text().strip())
    except (ValueError, UnicodeDecodeError):
        signature = b""
    try:
        VerifyKey(verify_key).verify((bundle_dir / MANIFEST_NAME).read_bytes(), signature)
    except (BadSignatureError, ValueError):
        raise CoFormerError(f"bundle {bundle_dir}: {MANIFEST_NAME} does not match its signature under operator "
                            f"key {verify_key.hex()[:16]}...; the manifest was edited or signed by someone else, "
                            "so it is refused (copy the operator's bundle again)") from None


# -- sockets ---------------------------------------------------------------------
def start_authenticator(ctx, keys: RoleKeys):
    """The central node's ZAP handler: ``back`` admits device keys, ``front`` client keys."""
    from zmq.auth.thread import ThreadAuthenticator

    auth = ThreadAuthenticator(ctx, log=logging.getLogger("coformer.zap"))
    auth.start()
    auth.configure_curve(domain="back", location=str(keys.devices_dir))
    auth.configure_curve(domain="front", location=str(keys.clients_dir))
    return auth


def curve_server(sock, keys: RoleKeys, domain: str) -> None:
    import zmq

    sock.setsockopt(zmq.ZAP_DOMAIN, domain.encode())
    sock.curve_secretkey = keys.secret
    sock.curve_publickey = keys.public
    sock.curve_server = True


def curve_client(sock, keys: RoleKeys) -> None:
    sock.curve_secretkey = keys.secret
    sock.curve_publickey = keys.public
    sock.curve_serverkey = keys.server

# -*- coding: utf-8 -*-
# Copyright: dstack.tee contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The simulated TDX ("dstack-sim"): real-format v4 quotes that the real DCAP verifier accepts.

Each installation makes its own simulated Intel PKI once, in its state directory: a root CA, a
PCK platform CA, a PCK certificate carrying the Intel SGX extension (PPID, TCB, PCE-ID, FMSPC,
SGX type), a TCB signing certificate, and the attestation key of the simulated quoting enclave.
From them the simulator signs quotes (attestation key over header and TD report; PCK key over the
QE report, whose report_data binds the attestation key) and collateral (TCB info, QE identity,
CRLs) exactly as Intel's services do. A verifier (dcap-qvl) then runs the same code for real and
simulated quotes; only the trusted root differs, and this root is labelled simulated everywhere.

State directory (mode 0700; keys 0600, written atomically, loaded on later opens and never
replaced when present but damaged):

    root-ca.key  root-ca.crt            the simulated SGX root CA
    pck-ca.key   pck-ca.crt             the simulated PCK platform CA
    pck.key      pck.crt                the PCK certificate with the SGX extension
    tcb-signing.key  tcb-signing.crt    signs TCB info and QE identity
    attestation.key                     the QE's attestation key (signs quotes)
    platform.json                       PPID, FMSPC and the QE id of this installation
    rtmrs.json                          MRTD and RTMR0-3 of a TD (see launch_measurements)

What the simulated launch measures (launch_measurements): real TDX measures the firmware into
MRTD, the virtual hardware into RTMR0, the kernel into RTMR1 and the kernel command line (which
holds the rootfs verity hash) and initrd into RTMR2, so the OS image is bound to MRTD and
RTMR0-2. The simulator has no image bytes to measure: it measures the os_image_hash the host
names in vm_config (and cpu_count, memory_size), with the same registers playing the same
parts. So a KMS can pin MRTD and RTMR0-2 per OS image here as on real TDX, but here the pin
proves only which image the host named, not the image's bytes.
"""

import datetime
import fcntl
import functools
import hashlib
import json
import os
import re
import secrets
import time

from ansible_collections.dstack.tee.plugins.module_utils.errors import DstackError, parse_hex
from ansible_collections.dstack.tee.plugins.module_utils.eventlog import check_rtmr_args, extend
from ansible_collections.dstack.tee.plugins.module_utils.fileio import atomic_write, locked, read_bytes
from ansible_collections.dstack.tee.plugins.module_utils.signatures import raw_ecdsa_signature
from ansible_collections.dstack.tee.plugins.module_utils.tdx_quote import (
    CERT_TYPE_PCK_CHAIN, TD_ATTRIBUTES_DEBUG, QeCertificationData, Quote, QuoteError, QuoteHeader, SgxReportBody,
    TdReport10, pad_report_data, parse_quote)

try:
    from cryptography import x509
    from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID
except ImportError:  # reported by callers through HAS_CRYPTOGRAPHY
    HAS_CRYPTOGRAPHY = False
else:
    HAS_CRYPTOGRAPHY = True

ATTESTATION_MODE = "dstack-sim"
SGX_EXTENSION_OID = "1.2.840.113741.1.13.1"
RTMR_SIZE = 48

# The simulated platform's TCB. The collateral's TCB levels are built around these values, so a
# quote matches the level that carries the status asked for.
CPU_SVN = bytes([3, 3, 2, 2, 4, 1, 0, 5] + [0] * 8)
PCE_SVN = 11
PCE_ID = bytes(2)
SGX_TYPE_STANDARD = 0
TEE_TCB_SVN = bytes([6, 1, 3] + [0] * 13)  # [0] TDX module SVN, [1] its major version, [2] microcode
TDX_MODULE_MRSIGNER = bytes(48)  # Intel's TDX module signer is all zeros in TCB info too
SEAM_ATTRIBUTES = bytes(8)
MR_SEAM = hashlib.sha384(b"dstack-sim TDX module").digest()
TD_ATTRIBUTES = bytes([0, 0, 0, 0x10, 0, 0, 0, 0])  # SEPT_VE_DISABLE (bit 28), as DCAP requires
XFAM = bytes.fromhex("e702060000000000")
TCB_EVALUATION_DATA_NUMBER = 17
# The simulated TD quoting enclave: its report and the QE identity that accepts it.
QE_ISV_PROD_ID = 2  # TD_QE
QE_ISV_SVN = 4
QE_MISC_SELECT = bytes(4)
QE_ATTRIBUTES = bytes([0x11] + [0] * 15)
QE_ATTRIBUTES_MASK = bytes.fromhex("FBFFFFFFFFFFFFFF0000000000000000")
QE_MR_SIGNER = hashlib.sha256(b"dstack-sim TD quoting enclave signer").digest()
QE_MR_ENCLAVE = hashlib.sha256(b"dstack-sim TD quoting enclave").digest()
QE_AUTH_DATA = bytes(range(32))  # DCAP requires 32 bytes of QE authentication data
TCB_DATE = "2024-03-13T00:00:00Z"
OLD_TCB_DATE = "2023-08-09T00:00:00Z"
_ISO_RE = re.compile(r"\A\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z\Z")

TCB_STATUSES = ("UpToDate", "SWHardeningNeeded", "ConfigurationNeeded", "ConfigurationAndSWHardeningNeeded",
                "OutOfDate", "OutOfDateConfigurationNeeded", "Revoked")
# Statuses that mean a newer TCB exists: the collateral then lists a higher, UpToDate level first.
_BEHIND_STATUSES = ("OutOfDate", "OutOfDateConfigurationNeeded", "Revoked")
COLLATERAL_VALIDITY = 30 * 24 * 3600  # Intel's TCB info and CRLs are valid for 30 days
COLLATERAL_BACKDATE = 3600  # issued an hour before `now`, so small clock skews still verify
CERT_NOT_BEFORE = datetime.datetime(2020, 1, 1, tzinfo=datetime.timezone.utc)
CERT_NOT_AFTER = datetime.datetime(2049, 12, 31, 23, 59, 59, tzinfo=datetime.timezone.utc)

SIM_ORG = "dstack.tee simulated TEE (not Intel)"
ROOT_CA_CN = "dstack-sim SGX Root CA"
PCK_CA_CN = "dstack-sim SGX PCK Platform CA"
PCK_CN = "dstack-sim SGX PCK Certificate"
TCB_SIGNING_CN = "dstack-sim SGX TCB Signing"

KEY_NAMES = ("root-ca", "pck-ca", "pck", "tcb-signing", "attestation")
CERT_NAMES = ("root-ca", "pck-ca", "pck", "tcb-signing")
PLATFORM_FILE = "platform.json"
# The platform's files: every host that signs or verifies quotes of this installation needs a copy
# (dstack.tee.sim_platform_info reads them, dstack.tee.sim_platform writes them; the kms role's
# dstack_kms_sim_state_files is the same list). rtmrs.json, a TD's measurements, is not one of them.
PLATFORM_FILES = ("root-ca.key", "root-ca.crt", "pck-ca.key", "pck-ca.crt", "pck.key", "pck.crt", "tcb-signing.key",
                  "tcb-signing.crt", "attestation.key", PLATFORM_FILE)
RTMRS_FILE = "rtmrs.json"
PKI_LOCK = ".pki.lock"
RTMRS_LOCK = ".rtmrs.lock"
REPORT_FIELDS = tuple(name for name, _size in TdReport10.LAYOUT if name != "report_data")


# --- a little DER, for the Intel SGX extension (cryptography has no general ASN.1 encoder) ---

def launch_measurements(vm_config=None):
    """{"mr_td", "rtmr0", "rtmr1", "rtmr2"}: what the simulated TDX module and firmware measure
    when a TD with this vm_config (a dict or its JSON text) is launched (see the module docstring)."""
    if isinstance(vm_config, (str, bytes)):
        try:
            vm_config = json.loads(vm_config or "{}")
        except ValueError:
            raise DstackError("vm_config", "is not JSON") from None
    vm_config = vm_config if isinstance(vm_config, dict) else {}
    image = parse_hex(str(vm_config.get("os_image_hash") or ""), "vm_config.os_image_hash", allow_empty=True)

    def measured(*parts):
        return hashlib.sha384(bytes(RTMR_SIZE) + hashlib.sha384(b":".join(parts)).digest()).digest()

    hardware = json.dumps({"cpu_count": vm_config.get("cpu_count"), "memory_size": vm_config.get("memory_size")},
                          sort_keys=True).encode()
    return {"mr_td": hashlib.sha384(b"dstack-sim-firmware:" + image).digest(),
            "rtmr0": measured(b"dstack-sim-hardware", hardware),
            "rtmr1": measured(b"dstack-sim-kernel", image),
            "rtmr2": measured(b"dstack-sim-cmdline-initrd", image)}


def _der(tag, content):
    size = len(content)
    if size < 0x80:
        length = bytes([size])
    else:
        raw = size.to_bytes((size.bit_length() + 7) // 8, "big")
        length = bytes([0x80 | len(raw)]) + raw
    return bytes([tag]) + length + content


def _der_oid(dotted):
    arcs = [int(arc) for arc in dotted.split(".")]
    out = bytearray()
    for arc in [40 * arcs[0] + arcs[1]] + arcs[2:]:
        chunk = [arc & 0x7F]
        arc >>= 7
        while arc:
            chunk.append(0x80 | (arc & 0x7F))
            arc >>= 7
        out += bytes(reversed(chunk))
    return _der(0x06, bytes(out))


def _der_uint(value, tag=0x02):
    return _der(tag, value.to_bytes(value.bit_length() // 8 + 1, "big"))


def _der_seq(*items):
    return _der(0x30, b"".join(items))


def _der_entry(oid_suffix, value):
    return _der_seq(_der_oid(SGX_EXTENSION_OID + oid_suffix), value)


def sgx_extension(ppid, fmspc, cpu_svn=CPU_SVN, pce_svn=PCE_SVN, pce_id=PCE_ID, sgx_type=SGX_TYPE_STANDARD):
    """The DER value of the Intel SGX extension of a PCK certificate (as Intel's PCK certs carry it).

    SEQUENCE of (OID, value): PPID (.1), TCB (.2: SGX TCB components .2.1-.2.16, PCESVN .2.17,
    CPUSVN .2.18), PCE-ID (.3), FMSPC (.4), SGX type (.5, ENUMERATED).
    """
    tcb = [_der_entry(f".2.{i + 1}", _der_uint(svn)) for i, svn in enumerate(cpu_svn)]
    tcb.append(_der_entry(".2.17", _der_uint(pce_svn)))
    tcb.append(_der_entry(".2.18", _der(0x04, cpu_svn)))
    return _der_seq(_der_entry(".1", _der(0x04, ppid)),
                    _der_entry(".2", _der_seq(*tcb)),
                    _der_entry(".3", _der(0x04, pce_id)),
                    _der_entry(".4", _der(0x04, fmspc)),
                    _der_entry(".5", _der_uint(sgx_type, tag=0x0A)))


# --- keys, certificates, signatures ---

def _name(common_name):
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name),
                      x509.NameAttribute(NameOID.ORGANIZATION_NAME, SIM_ORG),
                      x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, ATTESTATION_MODE)])


def _certificate(subject_cn, key, issuer_cert, issuer_key, ca_path_length=None, extra=()):
    """A v3 certificate as Intel's SGX PKI makes them: CA certificates sign certificates and CRLs,
    leaf certificates sign data; no extended key usage (webpki would then demand serverAuth)."""
    is_ca = ca_path_length is not None
    subject = _name(subject_cn)
    issuer = issuer_cert.subject if issuer_cert is not None else subject
    public = key.public_key()
    issuer_public = issuer_key.public_key()
    builder = (x509.CertificateBuilder()
               .subject_name(subject).issuer_name(issuer).public_key(public)
               .serial_number(x509.random_serial_number())
               .not_valid_before(CERT_NOT_BEFORE).not_valid_after(CERT_NOT_AFTER)
               .add_extension(x509.BasicConstraints(ca=is_ca, path_length=ca_path_length), critical=True)
               .add_extension(x509.KeyUsage(digital_signature=not is_ca, content_commitment=not is_ca,
                                            key_encipherment=False, data_encipherment=False, key_agreement=False,
                                            key_cert_sign=is_ca, crl_sign=is_ca, encipher_only=False,
                                            decipher_only=False), critical=True)
               .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
               .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_public), critical=False))
    for ext in extra:
        builder = builder.add_extension(ext, critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _crl(issuer_cert, issuer_key, this_update, next_update):
    """An empty CRL (v2, with CRL number and authority key id), DER."""
    builder = (x509.CertificateRevocationListBuilder()
               .issuer_name(issuer_cert.subject)
               .last_update(this_update).next_update(next_update)
               .add_extension(x509.CRLNumber(1), critical=False)
               .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()),
                              critical=False))
    return builder.sign(issuer_key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)


def _pem(cert):
    return cert.public_bytes(serialization.Encoding.PEM)


def _key_pem(key):
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _same_public_key(one, other):
    fmt = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return one.public_bytes(*fmt) == other.public_bytes(*fmt)


def _iso(timestamp):
    return datetime.datetime.fromtimestamp(int(timestamp), datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _dt(timestamp):
    return datetime.datetime.fromtimestamp(int(timestamp), datetime.timezone.utc)


def _svn_components(svns):
    return [{"svn": svn} for svn in svns]


def issued_by_simulator(quote):
    """Whether a quote's PCK chain ends at a dstack.tee simulator's root (its organization names the
    simulator): to tell a user who checks it against Intel's root what happened. Never a trust
    decision: only the verifier's chain check is one."""
    try:
        chain = parse_quote(bytes(quote)).certification.pck_chain_der()
        return bool(chain) and any(attr.value == SIM_ORG for attr in x509.load_der_x509_certificate(chain[-1])
                                   .issuer.get_attributes_for_oid(NameOID.ORGANIZATION_NAME))
    except (QuoteError, ValueError, TypeError):
        return False


def _tcb_level(cpu_svn, pce_svn, tee_tcb_svn, status, tcb_date, advisory_ids=()):
    level = {"tcb": {"sgxtcbcomponents": _svn_components(cpu_svn), "pcesvn": pce_svn,
                     "tdxtcbcomponents": _svn_components(tee_tcb_svn)},
             "tcbDate": tcb_date, "tcbStatus": status}
    if advisory_ids:
        level["advisoryIDs"] = list(advisory_ids)
    return level


class SimTdx:
    """The simulated TDX of one installation (its state directory)."""

    attestation_mode = ATTESTATION_MODE

    def __init__(self, state_dir, rtmr_state=None):
        """Open the simulated installation in state_dir.

        rtmr_state: the file that holds this TD's RTMRs (default state_dir/rtmrs.json). Each
        simulated CVM passes its own, so that CVMs share the simulated platform and root of
        trust, as TDs on one host share the real ones, but each has its own measurements.
        """
        if not HAS_CRYPTOGRAPHY:
            raise DstackError("tdx_sim", "the simulated TDX needs the Python package cryptography")
        if not state_dir:
            raise DstackError("state_dir", "is required for the simulated TDX")
        self.state_dir = os.path.abspath(state_dir)
        self.rtmr_state = os.path.abspath(rtmr_state) if rtmr_state else self._path(RTMRS_FILE)
        self._keys = {}
        self._certs = {}
        self._platform = {}
        self._open()

    @classmethod
    def existing(cls, state_dir, field="sim_state_dir"):
        """The simulated TDX already installed in state_dir, for a verifier: SimTdx() would make a
        new installation in an empty or wrong folder, whose root no quote chains to."""
        if not state_dir or not os.path.isfile(os.path.join(state_dir, "root-ca.crt")):
            raise DstackError(field, f"{state_dir} holds no simulated TDX (no root-ca.crt): give the simulator's "
                                     "state directory (the demo's is .demo/kms/tdx-sim)")
        return cls(state_dir)

    # --- state: the simulated PKI ---

    def _path(self, name):
        return os.path.join(self.state_dir, name)

    def _open(self):
        try:
            os.makedirs(self.state_dir, mode=0o700, exist_ok=True)
            if os.stat(self.state_dir).st_mode & 0o077:
                os.chmod(self.state_dir, 0o700)
        except OSError as exc:
            raise DstackError("state_dir", f"cannot prepare {self.state_dir}: {exc.strerror}") from None
        with locked(self._path(PKI_LOCK), fcntl.LOCK_EX):
            present = [name for name in PLATFORM_FILES if os.path.lexists(self._path(name))]
            if not present:
                self._create()
            elif len(present) != len(PLATFORM_FILES):
                missing = ", ".join(name for name in PLATFORM_FILES if name not in present)
                raise DstackError("tdx_sim", f"the simulated PKI in {self.state_dir} is incomplete ({missing} "
                                             "missing); it is not replaced: restore the files, or remove the "
                                             "directory to start a new simulated installation")
            self._load()
        with locked(self._rtmr_lock(), fcntl.LOCK_EX):
            if not os.path.lexists(self.rtmr_state):
                self._write_rtmrs([bytes(RTMR_SIZE)] * 4)

    def _create(self):
        keys = {name: ec.generate_private_key(ec.SECP256R1()) for name in KEY_NAMES}
        platform = {"ppid": secrets.token_bytes(16).hex(), "fmspc": secrets.token_bytes(6).hex(),
                    "qe_id": secrets.token_bytes(16).hex()}
        root = _certificate(ROOT_CA_CN, keys["root-ca"], None, keys["root-ca"], ca_path_length=1)
        pck_ca = _certificate(PCK_CA_CN, keys["pck-ca"], root, keys["root-ca"], ca_path_length=0)
        extension = x509.UnrecognizedExtension(
            x509.ObjectIdentifier(SGX_EXTENSION_OID),
            sgx_extension(bytes.fromhex(platform["ppid"]), bytes.fromhex(platform["fmspc"])))
        pck = _certificate(PCK_CN, keys["pck"], pck_ca, keys["pck-ca"], extra=(extension,))
        tcb = _certificate(TCB_SIGNING_CN, keys["tcb-signing"], root, keys["root-ca"])
        certs = {"root-ca": root, "pck-ca": pck_ca, "pck": pck, "tcb-signing": tcb}
        for name, key in keys.items():
            atomic_write(self._path(name + ".key"), _key_pem(key), 0o600)
        for name, cert in certs.items():
            atomic_write(self._path(name + ".crt"), _pem(cert), 0o644)
        atomic_write(self._path(PLATFORM_FILE), (json.dumps(platform, indent=2, sort_keys=True) + "\n").encode(),
                     0o644)

    def _load(self):
        for name in KEY_NAMES:
            path = self._path(name + ".key")
            try:
                key = serialization.load_pem_private_key(read_bytes(path, name + ".key"), password=None)
            except (ValueError, TypeError, UnsupportedAlgorithm):
                raise DstackError(name + ".key", f"{path} is damaged (not a PEM private key); it is not "
                                                 "replaced: restore it from a backup or remove the state "
                                                 "directory") from None
            if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name != "secp256r1":
                raise DstackError(name + ".key", f"{path} is not a P-256 key")
            self._keys[name] = key
        for name in CERT_NAMES:
            path = self._path(name + ".crt")
            try:
                cert = x509.load_pem_x509_certificate(read_bytes(path, name + ".crt"))
            except ValueError:
                raise DstackError(name + ".crt", f"{path} is damaged (not a PEM certificate)") from None
            if not _same_public_key(cert.public_key(), self._keys[name].public_key()):
                raise DstackError(name + ".crt", f"{path} does not belong to {name}.key")
            self._certs[name] = cert
        for name, issuer in (("root-ca", "root-ca"), ("pck-ca", "root-ca"), ("pck", "pck-ca"),
                             ("tcb-signing", "root-ca")):
            try:
                self._certs[name].verify_directly_issued_by(self._certs[issuer])
            except (ValueError, TypeError, InvalidSignature):
                raise DstackError(name + ".crt", f"is not issued by {issuer}.crt") from None
        self._platform = self._load_platform()
        try:
            ext = self._certs["pck"].extensions.get_extension_for_oid(x509.ObjectIdentifier(SGX_EXTENSION_OID))
        except x509.ExtensionNotFound:
            raise DstackError("pck.crt", "has no Intel SGX extension") from None
        if ext.value.value != sgx_extension(self._platform["ppid"], self._platform["fmspc"]):
            raise DstackError("pck.crt", f"its SGX extension does not match {PLATFORM_FILE}")

    def _load_platform(self):
        path = self._path(PLATFORM_FILE)
        try:
            data = json.loads(read_bytes(path, PLATFORM_FILE))
            if not isinstance(data, dict):
                raise ValueError("not an object")
            return {"ppid": parse_hex(data.get("ppid"), "ppid", 16),
                    "fmspc": parse_hex(data.get("fmspc"), "fmspc", 6),
                    "qe_id": parse_hex(data.get("qe_id"), "qe_id", 16)}
        except (ValueError, UnicodeDecodeError) as exc:
            raise DstackError(PLATFORM_FILE, f"{path} is damaged ({exc})") from None

    # --- what the installation is ---

    @property
    def root_ca_der(self):
        return self._certs["root-ca"].public_bytes(serialization.Encoding.DER)

    @property
    def root_ca_pem(self):
        return _pem(self._certs["root-ca"])

    @property
    def pck_chain_pem(self):
        """The PCK certificate chain a quote carries: PCK, PCK platform CA, root CA."""
        return b"".join(_pem(self._certs[name]) for name in ("pck", "pck-ca", "root-ca"))

    @property
    def ppid(self):
        return self._platform["ppid"]

    @property
    def fmspc(self):
        return self._platform["fmspc"]

    @property
    def device_id(self):
        """dstack's device id: SHA-256 of the PPID (dstack-reference 7.4)."""
        return hashlib.sha256(self.ppid).digest()

    @functools.cached_property
    def attestation_public_key(self):
        """The attestation key as a quote carries it: X || Y, 64 bytes."""
        public = self._keys["attestation"].public_key()
        point = public.public_bytes(serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)
        return point[1:]

    # --- collateral ---

    def collateral(self, *, now=None, tcb_status="UpToDate", advisory_ids=(), tcb_date=None):
        """Signed DCAP collateral (QuoteCollateralV3 JSON, as a dict) valid around `now`.

        TCB info, QE identity and both CRLs are issued an hour before `now` (default: the current
        time) and expire 30 days after it. The TCB level that matches the simulated platform
        carries `tcb_status` and `advisory_ids`; when the status says the platform is behind
        (OutOfDate, OutOfDateConfigurationNeeded, Revoked) a newer UpToDate level the platform does
        not reach is listed before it. `tcb_date` (a Unix time or an ISO 8601 UTC string) is the
        tcbDate of every level the quote matches (platform, TDX module, QE); by default fixed
        dates in the past, as Intel's are. dcap-qvl's policies take the oldest of them as the
        platform's TCB date and refuse an OutOfDate platform when that date plus the platform
        grace period is before the verification time: pass tcb_date=now for a fresh one.
        """
        if tcb_date is None:
            level_date = OLD_TCB_DATE if tcb_status in _BEHIND_STATUSES else TCB_DATE
            tcb_date = TCB_DATE
        elif isinstance(tcb_date, (int, float)) and not isinstance(tcb_date, bool):
            tcb_date = level_date = _iso(tcb_date)
        elif not isinstance(tcb_date, str) or not _ISO_RE.match(tcb_date):
            raise DstackError("tcb_date", "must be a Unix time or a UTC time like 2024-03-13T00:00:00Z")
        else:
            level_date = tcb_date
        if tcb_status not in TCB_STATUSES:
            raise DstackError("tcb_status", f"must be one of {', '.join(TCB_STATUSES)}, got {tcb_status!r}")
        if isinstance(advisory_ids, str):
            advisory_ids = [advisory_ids]
        advisory_ids = list(advisory_ids)
        if not all(isinstance(item, str) and item for item in advisory_ids):
            raise DstackError("advisory_ids", "must be a list of non-empty strings")
        now = time.time() if now is None else now
        if isinstance(now, bool) or not isinstance(now, (int, float)):
            raise DstackError("now", f"must be a Unix time, not {type(now).__name__}")
        issued = int(now) - COLLATERAL_BACKDATE
        expires = int(now) + COLLATERAL_VALIDITY
        tcb_info = json.dumps(self._tcb_info(issued, expires, tcb_status, advisory_ids, level_date, tcb_date),
                              separators=(",", ":"))
        qe_identity = json.dumps(self._qe_identity(issued, expires, tcb_date), separators=(",", ":"))
        signer = self._keys["tcb-signing"]
        tcb_chain = (_pem(self._certs["tcb-signing"]) + _pem(self._certs["root-ca"])).decode()
        return {
            "pck_crl_issuer_chain": (_pem(self._certs["pck-ca"]) + _pem(self._certs["root-ca"])).decode(),
            "root_ca_crl": _crl(self._certs["root-ca"], self._keys["root-ca"], _dt(issued), _dt(expires)).hex(),
            "pck_crl": _crl(self._certs["pck-ca"], self._keys["pck-ca"], _dt(issued), _dt(expires)).hex(),
            "tcb_info_issuer_chain": tcb_chain,
            "tcb_info": tcb_info,
            "tcb_info_signature": raw_ecdsa_signature(signer, tcb_info.encode()).hex(),
            "qe_identity_issuer_chain": tcb_chain,
            "qe_identity": qe_identity,
            "qe_identity_signature": raw_ecdsa_signature(signer, qe_identity.encode()).hex(),
        }

    def collateral_json(self, **kw):
        return json.dumps(self.collateral(**kw))

    def _tcb_info(self, issued, expires, tcb_status, advisory_ids, level_date, module_date):
        levels = []
        if tcb_status in _BEHIND_STATUSES:
            levels.append(_tcb_level(CPU_SVN, PCE_SVN + 1, TEE_TCB_SVN, "UpToDate", _iso(issued)))
        levels.append(_tcb_level(CPU_SVN, PCE_SVN, TEE_TCB_SVN, tcb_status, level_date, advisory_ids))
        older_tee = bytes([TEE_TCB_SVN[0] - 1]) + TEE_TCB_SVN[1:]
        levels.append(_tcb_level(CPU_SVN, PCE_SVN - 6, older_tee, "OutOfDate", "2018-01-04T00:00:00Z",
                                 ["INTEL-SA-00106"]))
        module = {"mrsigner": TDX_MODULE_MRSIGNER.hex().upper(), "attributes": SEAM_ATTRIBUTES.hex().upper(),
                  "attributesMask": "FFFFFFFFFFFFFFFF"}
        identity = dict(module, id=f"TDX_{TEE_TCB_SVN[1]:02X}",
                        tcbLevels=[{"tcb": {"isvsvn": TEE_TCB_SVN[0]}, "tcbDate": module_date,
                                    "tcbStatus": "UpToDate"}])
        return {"id": "TDX", "version": 3, "issueDate": _iso(issued), "nextUpdate": _iso(expires),
                "fmspc": self.fmspc.hex().upper(), "pceId": PCE_ID.hex().upper(), "tcbType": 0,
                "tcbEvaluationDataNumber": TCB_EVALUATION_DATA_NUMBER, "tdxModule": module,
                "tdxModuleIdentities": [identity], "tcbLevels": levels}

    @staticmethod
    def _qe_identity(issued, expires, tcb_date):
        return {"id": "TD_QE", "version": 2, "issueDate": _iso(issued), "nextUpdate": _iso(expires),
                "tcbEvaluationDataNumber": TCB_EVALUATION_DATA_NUMBER,
                "miscselect": QE_MISC_SELECT.hex().upper(), "miscselectMask": "FFFFFFFF",
                "attributes": QE_ATTRIBUTES.hex().upper(), "attributesMask": QE_ATTRIBUTES_MASK.hex().upper(),
                "mrsigner": QE_MR_SIGNER.hex().upper(), "isvprodid": QE_ISV_PROD_ID,
                "tcbLevels": [{"tcb": {"isvsvn": QE_ISV_SVN}, "tcbDate": tcb_date, "tcbStatus": "UpToDate"}]}

    # --- quotes ---

    def get_quote(self, report_data, *, debug=False, **report_fields):
        """A TDX v4 quote over `report_data` (at most 64 bytes, zero-padded).

        Any TD report field can be given (bytes or hex, its exact size): mr_td, mr_config_id,
        mr_owner, mr_owner_config, rtmr0-rtmr3 (default: the current RTMR values), td_attributes
        (default SEPT_VE_DISABLE only), xfam, tee_tcb_svn, mr_seam, mr_signer_seam,
        seam_attributes. debug=True sets bit 0 of td_attributes (DCAP verifiers refuse such quotes).
        """
        padded = pad_report_data(report_data)
        unknown = sorted(set(report_fields) - set(REPORT_FIELDS))
        if unknown:
            raise DstackError(unknown[0], f"is not a TD report field ({', '.join(REPORT_FIELDS)})")
        sizes = dict(TdReport10.LAYOUT)
        values = {"tee_tcb_svn": TEE_TCB_SVN, "mr_seam": MR_SEAM, "mr_signer_seam": TDX_MODULE_MRSIGNER,
                  "seam_attributes": SEAM_ATTRIBUTES, "td_attributes": TD_ATTRIBUTES, "xfam": XFAM}
        with locked(self._rtmr_lock(), fcntl.LOCK_SH):
            values.update(self._read_state())
        for name, value in report_fields.items():
            if value is not None:
                values[name] = parse_hex(value, name, sizes[name])
        if debug:
            attrs = values.get("td_attributes", TD_ATTRIBUTES)
            values["td_attributes"] = bytes([attrs[0] | TD_ATTRIBUTES_DEBUG]) + attrs[1:]
        report = TdReport10(report_data=padded, **values)
        header = QuoteHeader(qe_svn=QE_ISV_SVN, pce_svn=PCE_SVN, user_data=self._platform["qe_id"] + bytes(4))
        return self._sign(header, report)

    def _sign(self, header, report):
        signature = raw_ecdsa_signature(self._keys["attestation"], header.to_bytes() + report.to_bytes())
        return Quote(header, report, signature, self.attestation_public_key, self._qe_certification).to_bytes()

    @functools.cached_property
    def _qe_certification(self):
        """The QE's certification of the attestation key: the same in every quote of this platform (as
        a real QE's report over its attestation key is), so it is made and signed once."""
        qe_report = SgxReportBody(
            cpu_svn=CPU_SVN, misc_select=QE_MISC_SELECT, attributes=QE_ATTRIBUTES, mr_enclave=QE_MR_ENCLAVE,
            mr_signer=QE_MR_SIGNER, isv_prod_id=QE_ISV_PROD_ID.to_bytes(2, "little"),
            isv_svn=QE_ISV_SVN.to_bytes(2, "little"),
            report_data=hashlib.sha256(self.attestation_public_key + QE_AUTH_DATA).digest().ljust(64, b"\x00"))
        return QeCertificationData(
            qe_report=qe_report, qe_report_signature=raw_ecdsa_signature(self._keys["pck"], qe_report.to_bytes()),
            qe_auth_data=QE_AUTH_DATA, cert_type=CERT_TYPE_PCK_CHAIN, cert_data=self.pck_chain_pem)

    # --- RTMRs ---

    def read_rtmrs(self):
        """RTMR0-3 as they are now: four 48-byte values."""
        with locked(self._rtmr_lock(), fcntl.LOCK_SH):
            return self._read_rtmrs()

    def extend_rtmr(self, index, digest):
        """RTMR[index] = SHA-384(RTMR[index] || digest), under a lock so no concurrent extend is lost."""
        check_rtmr_args(index, digest)
        with locked(self._rtmr_lock(), fcntl.LOCK_EX):
            state = self._read_state()
            state[f"rtmr{index}"] = extend(state[f"rtmr{index}"], digest)
            self._write_state(state)

    def _read_state(self):
        """{"rtmr0".."rtmr3", and "mr_td" when the TD was launched with launch_measurements}."""
        path = self.rtmr_state
        try:
            data = json.loads(read_bytes(path, RTMRS_FILE))
            state = {f"rtmr{i}": parse_hex(data[f"rtmr{i}"], f"rtmr{i}", RTMR_SIZE) for i in range(4)}
            if data.get("mr_td"):
                state["mr_td"] = parse_hex(data["mr_td"], "mr_td", RTMR_SIZE)
            return state
        except (ValueError, KeyError, TypeError, UnicodeDecodeError, DstackError) as exc:
            raise DstackError(RTMRS_FILE, f"{path} is damaged ({exc}); it is not reset") from None

    def _read_rtmrs(self):
        state = self._read_state()
        return [state[f"rtmr{i}"] for i in range(4)]

    def reset_rtmrs(self, vm_config=None):
        """A new boot of this TD: RTMR3 back to zero, as a real TD starts. Given a vm_config, MRTD
        and RTMR0-2 hold its launch_measurements (the OS image it names); without one they are zero."""
        state = {f"rtmr{i}": bytes(RTMR_SIZE) for i in range(4)}
        if vm_config is not None:
            state.update(launch_measurements(vm_config))
        with locked(self._rtmr_lock(), fcntl.LOCK_EX):
            self._write_state(state)

    def _rtmr_lock(self):
        if self.rtmr_state == self._path(RTMRS_FILE):
            return self._path(RTMRS_LOCK)
        return self.rtmr_state + ".lock"

    def _write_rtmrs(self, rtmrs):
        self._write_state({f"rtmr{i}": value for i, value in enumerate(rtmrs)})

    def _write_state(self, state):
        text = json.dumps({name: value.hex() for name, value in sorted(state.items())}, indent=2) + "\n"
        atomic_write(self.rtmr_state, text.encode(), 0o600)

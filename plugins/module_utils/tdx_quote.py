# -*- coding: utf-8 -*-
# Copyright: dstack.tee contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""TDX quotes (v4, and v5 with TD report 1.0 or 1.5): parsing and building, one home for the layout.

Offsets follow Intel's DCAP quote format (dstack-reference 7.1): a 48-byte header, the TD report
body (584 bytes for TD report 1.0; v5 puts a type/size descriptor before it), then the u32
length of the signature data: the attestation key's ECDSA signature over header and body, the
attestation public key, and certification data of type 6 (QE report, its signature by the PCK
key, QE authentication data, and the PCK certificate chain as certification data of type 5).
Every parsing failure raises QuoteError naming what is wrong and where.

Every byte is accounted for: the signature data length, the type 6 size and the type 5 size must
each end exactly where the data they describe ends. After the signature data only zero bytes may
follow (real quote generators pad their buffers: Intel's sample quote has 70); they are kept in
Quote.padding, read by nothing, and any other byte there is refused. The PCK chain must be PEM
CERTIFICATE blocks, ASCII whitespace around them and NUL bytes after the last, each block strict
base64 of one DER SEQUENCE; the first block is the PCK leaf (as dcap-qvl reads it).

Quote identity. Some bytes of a valid quote can change without changing what it attests: the
padding, the PEM text of the chain (line breaks, whitespace), the intermediate and root
certificates (the verifier chains to its own trust root), and each ECDSA signature (s and n - s
both verify). So the SHA-256 of the raw bytes does not identify a quote; quote_identity() does,
and it is the one definition for audit logs and cache keys. It is the SHA-256 of
    IDENTITY_DOMAIN
    || header || (v5: body type u16, body size u32) || TD report body    (what the attestation key signs)
    || quote signature r || low-s                                        (64 bytes)
    || attestation key                                                   (64 bytes, X || Y)
    || QE report                                                         (384 bytes)
    || QE report signature r || low-s                                    (64 bytes)
    || u16 length || QE authentication data
    || u32 length || tbsCertificate of the PCK leaf, DER                 (what the PCK CA signs)
where low-s is min(s, n - s) with n the order of P-256 (big-endian, 32 bytes). For any raw bytes
the verifier accepts, every other encoding it also accepts has the same identity
(tests/unit/test_tdx_quote_fuzz.py checks that invariant).
"""

import base64
import functools
import hashlib
import operator
import struct
from dataclasses import dataclass, field, fields, replace

from ansible_collections.dstack.tee.plugins.module_utils.errors import DstackError
from ansible_collections.dstack.tee.plugins.module_utils.signatures import P256_ORDER, low_s

TEE_TYPE_TDX = 0x81
TEE_TYPE_SGX = 0x00
ATTESTATION_KEY_ECDSA_P256 = 2
CERT_TYPE_PCK_CHAIN = 5
CERT_TYPE_QE_REPORT = 6
BODY_TYPE_TD10 = 2
BODY_TYPE_TD15 = 3
INTEL_QE_VENDOR_ID = bytes.fromhex("939a7233f79c4ca9940a0db3957f0607")
TD_ATTRIBUTES_DEBUG = 0x01  # bit 0 of td_attributes: a debug TD, whose memory the host can read
MAX_QUOTE_SIZE = 64 * 1024
REPORT_DATA_SIZE = 64
IDENTITY_DOMAIN = b"dstack.tee TDX quote identity v1\x00"
PEM_BEGIN = b"-----BEGIN CERTIFICATE-----"
PEM_END = b"-----END CERTIFICATE-----"
PEM_WHITESPACE = b" \t\n\r\x0b\x0c"
_BASE64_ALPHABET = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/="


class QuoteError(DstackError):
    """A quote that cannot be parsed; the reason names the part and the offset."""

    def __init__(self, reason, field_name="quote"):
        super().__init__(field_name, reason)


class _Struct:
    """A fixed layout of byte fields; subclasses list (name, size) pairs in LAYOUT."""

    LAYOUT = ()
    _SIZE = 0

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        # Read on every parse and every identity: worked out once per layout. The dataclass fields
        # are in LAYOUT's order (test_tdx_quote_fuzz checks it), so that one C call reads them all.
        cls._SIZE = sum(size for _name, size in cls.LAYOUT)
        cls._SIZES = [size for _name, size in cls.LAYOUT]
        cls._FORMAT = struct.Struct("".join(f"{size}s" for _name, size in cls.LAYOUT))
        cls._VALUES = operator.attrgetter(*(name for name, _size in cls.LAYOUT))

    @classmethod
    def size(cls):
        return cls._SIZE

    @classmethod
    def from_bytes(cls, data, offset=0, what=None):
        what = what or cls.__name__
        end = offset + cls._SIZE
        if len(data) < end:
            raise QuoteError(f"truncated in the {what} at offset {offset}: needs {cls._SIZE} bytes, "
                             f"{max(0, len(data) - offset)} left")
        return cls(*cls._FORMAT.unpack_from(data, offset))

    def to_bytes(self):
        values = self._VALUES(self)
        if list(map(len, values)) != self._SIZES:
            for (name, size), value in zip(self.LAYOUT, values):
                if len(value) != size:
                    raise QuoteError(f"{name} must be {size} bytes, got {len(value)}", name)
        return b"".join(values)

    def to_dict(self):
        return {f.name: getattr(self, f.name).hex() for f in fields(self)}


def _zeros(size):
    return field(default_factory=lambda: bytes(size))  # pylint: disable=invalid-field-call


@dataclass
class TdReport10(_Struct):
    """TD report body 1.0 (584 bytes)."""
    LAYOUT = (("tee_tcb_svn", 16), ("mr_seam", 48), ("mr_signer_seam", 48), ("seam_attributes", 8),
              ("td_attributes", 8), ("xfam", 8), ("mr_td", 48), ("mr_config_id", 48), ("mr_owner", 48),
              ("mr_owner_config", 48), ("rtmr0", 48), ("rtmr1", 48), ("rtmr2", 48), ("rtmr3", 48),
              ("report_data", 64))
    tee_tcb_svn: bytes = _zeros(16)
    mr_seam: bytes = _zeros(48)
    mr_signer_seam: bytes = _zeros(48)
    seam_attributes: bytes = _zeros(8)
    td_attributes: bytes = _zeros(8)
    xfam: bytes = _zeros(8)
    mr_td: bytes = _zeros(48)
    mr_config_id: bytes = _zeros(48)
    mr_owner: bytes = _zeros(48)
    mr_owner_config: bytes = _zeros(48)
    rtmr0: bytes = _zeros(48)
    rtmr1: bytes = _zeros(48)
    rtmr2: bytes = _zeros(48)
    rtmr3: bytes = _zeros(48)
    report_data: bytes = _zeros(64)

    @property
    def rtmrs(self):
        return [self.rtmr0, self.rtmr1, self.rtmr2, self.rtmr3]

    @property
    def debug(self):
        return bool(self.td_attributes[0] & TD_ATTRIBUTES_DEBUG)


@dataclass
class TdReport15(TdReport10):
    """TD report body 1.5 (648 bytes): 1.0 plus tee_tcb_svn2 and mr_service_td."""
    LAYOUT = TdReport10.LAYOUT + (("tee_tcb_svn2", 16), ("mr_service_td", 48))
    tee_tcb_svn2: bytes = _zeros(16)
    mr_service_td: bytes = _zeros(48)


@dataclass
class SgxReportBody(_Struct):
    """The SGX enclave report body (384 bytes): here, the QE's report."""
    LAYOUT = (("cpu_svn", 16), ("misc_select", 4), ("reserved1", 28), ("attributes", 16),
              ("mr_enclave", 32), ("reserved2", 32), ("mr_signer", 32), ("reserved3", 96),
              ("isv_prod_id", 2), ("isv_svn", 2), ("reserved4", 60), ("report_data", 64))
    cpu_svn: bytes = _zeros(16)
    misc_select: bytes = _zeros(4)
    reserved1: bytes = _zeros(28)
    attributes: bytes = _zeros(16)
    mr_enclave: bytes = _zeros(32)
    reserved2: bytes = _zeros(32)
    mr_signer: bytes = _zeros(32)
    reserved3: bytes = _zeros(96)
    isv_prod_id: bytes = _zeros(2)
    isv_svn: bytes = _zeros(2)
    reserved4: bytes = _zeros(60)
    report_data: bytes = _zeros(64)


def pad_report_data(report_data):
    """report_data as the quote holds it: the caller's bytes (at most 64), right-padded with zeros."""
    if not isinstance(report_data, (bytes, bytearray)):
        raise DstackError("report_data", f"must be bytes, not {type(report_data).__name__}")
    data = bytes(report_data)
    if len(data) > REPORT_DATA_SIZE:
        raise DstackError("report_data", f"is {len(data)} bytes; at most {REPORT_DATA_SIZE} are allowed")
    return data.ljust(REPORT_DATA_SIZE, b"\x00")


@dataclass
class QuoteHeader:
    """The 48-byte quote header."""
    version: int = 4
    attestation_key_type: int = ATTESTATION_KEY_ECDSA_P256
    tee_type: int = TEE_TYPE_TDX
    qe_svn: int = 0
    pce_svn: int = 0
    qe_vendor_id: bytes = INTEL_QE_VENDOR_ID
    user_data: bytes = _zeros(20)

    SIZE = 48
    _FMT = "<HHIHH16s20s"

    @classmethod
    def from_bytes(cls, data):
        if len(data) < cls.SIZE:
            raise QuoteError(f"truncated in the header: {len(data)} bytes, a quote starts with {cls.SIZE}")
        return cls(*struct.unpack_from(cls._FMT, data, 0))

    def to_bytes(self):
        return struct.pack(self._FMT, self.version, self.attestation_key_type, self.tee_type,
                           self.qe_svn, self.pce_svn, self.qe_vendor_id, self.user_data)

    def to_dict(self):
        return {"version": self.version, "attestation_key_type": self.attestation_key_type,
                "tee_type": self.tee_type, "qe_svn": self.qe_svn, "pce_svn": self.pce_svn,
                "qe_vendor_id": self.qe_vendor_id.hex(), "user_data": self.user_data.hex()}


@dataclass
class QeCertificationData:
    """Certification data of type 6: the QE report, its PCK signature, QE auth data, the PCK chain."""
    qe_report: SgxReportBody
    qe_report_signature: bytes
    qe_auth_data: bytes
    cert_type: int
    cert_data: bytes

    def to_bytes(self):
        inner = struct.pack("<HI", self.cert_type, len(self.cert_data)) + self.cert_data
        body = (self.qe_report.to_bytes() + self.qe_report_signature
                + struct.pack("<H", len(self.qe_auth_data)) + self.qe_auth_data + inner)
        return struct.pack("<HI", CERT_TYPE_QE_REPORT, len(body)) + body

    @property
    def pck_chain_pem(self):
        return self.cert_data if self.cert_type == CERT_TYPE_PCK_CHAIN else None

    def pck_chain_der(self):
        """The PCK chain's certificates in DER, leaf first. Raises QuoteError on a malformed chain."""
        if self.cert_type != CERT_TYPE_PCK_CHAIN:
            raise QuoteError(f"carries certification data of type {self.cert_type} inside its QE report "
                             f"data; TDX quotes carry the PCK certificate chain (type {CERT_TYPE_PCK_CHAIN})")
        return list(_pck_chain(bytes(self.cert_data))[0])

    def pck_leaf_tbs(self):
        """The PCK leaf's tbsCertificate in DER: the bytes the PCK CA signs."""
        self.pck_chain_der()  # the certification data type, checked first
        return _pck_chain(bytes(self.cert_data))[1]


@dataclass
class Quote:
    """A parsed TDX quote. `signed_bytes` is what the attestation key signs (header and body)."""
    header: QuoteHeader
    report: TdReport10
    signature: bytes
    attestation_key: bytes
    certification: QeCertificationData
    body_type: int = BODY_TYPE_TD10
    raw: bytes = b""
    padding: bytes = b""  # the zero bytes after the signature data (see the module docstring)

    @property
    def signed_bytes(self):
        out = self.header.to_bytes()
        if self.header.version >= 5:
            out += struct.pack("<HI", self.body_type, self.report.size())
        return out + self.report.to_bytes()

    @property
    def signed_length(self):
        descriptor = 6 if self.header.version >= 5 else 0
        return QuoteHeader.SIZE + descriptor + self.report.size()

    def to_bytes(self):
        """Serialize (the simulator builds quotes with this); signature fields as they are set."""
        auth = self.signature + self.attestation_key + self.certification.to_bytes()
        return self.signed_bytes + struct.pack("<I", len(auth)) + auth + self.padding

    def identity(self):
        """The quote's identity (hex SHA-256 of its signed parts): see the module docstring."""
        cert = self.certification
        leaf_tbs = cert.pck_leaf_tbs()
        digest = hashlib.sha256(IDENTITY_DOMAIN)
        for part in (self.signed_bytes, _low_s(self.signature), self.attestation_key, cert.qe_report.to_bytes(),
                     _low_s(cert.qe_report_signature), struct.pack("<H", len(cert.qe_auth_data)),
                     cert.qe_auth_data, struct.pack("<I", len(leaf_tbs)), leaf_tbs):
            digest.update(part)
        return digest.hexdigest()

    def to_dict(self):
        return {"header": self.header.to_dict(), "body_type": self.body_type,
                "report": self.report.to_dict(), "signature": self.signature.hex(),
                "attestation_key": self.attestation_key.hex(),
                "qe_report": self.certification.qe_report.to_dict(),
                "qe_report_signature": self.certification.qe_report_signature.hex(),
                "qe_auth_data": self.certification.qe_auth_data.hex(),
                "cert_type": self.certification.cert_type}


def quote_identity(quote):
    """The identity of a quote (raw bytes, or a Quote from parse_quote): a hex SHA-256 over its
    signed parts, equal for every encoding of the same evidence. Raises QuoteError if the bytes do
    not parse. Audit logs and cache keys use this, never a hash of the raw bytes."""
    if not isinstance(quote, Quote):
        quote = parse_quote(quote)
    return quote.identity()


def _low_s(signature):
    """A raw r || s P-256 signature with s replaced by min(s, n - s): (r, s) and (r, n - s) both verify."""
    return signature[:32] + low_s(int.from_bytes(signature[32:], "big"), P256_ORDER).to_bytes(32, "big")


def _der_sequence(data, offset, what):
    """(content start, content end) of the DER SEQUENCE at `offset`; it must lie within `data`."""
    if len(data) < offset + 2 or data[offset] != 0x30:
        raise QuoteError(f"has a {what} that is not a DER SEQUENCE")
    first = data[offset + 1]
    start = offset + 2
    if first < 0x80:
        length = first
    else:
        count = first & 0x7F
        if not 1 <= count <= 3 or len(data) < start + count:
            raise QuoteError(f"has a {what} with a bad DER length")
        length = int.from_bytes(data[start:start + count], "big")
        start += count
        if length < 0x80 or length >> (8 * (count - 1)) == 0:
            raise QuoteError(f"has a {what} with a non-minimal DER length")
    if start + length > len(data):
        raise QuoteError(f"has a {what} of {length} bytes where {len(data) - start} are left")
    return start, start + length


# A platform's PCK chain is the same in every quote it makes: its reading (the certificates, the
# leaf's tbsCertificate) is kept per exact chain bytes, so that a quote's parse and its identity
# read it once, and a platform's next quotes not again. Only a chain that reads is kept (lru_cache
# keeps no exception): a bad one is refused by name every time.
PCK_CHAIN_CACHE_SIZE = 64


@functools.lru_cache(maxsize=PCK_CHAIN_CACHE_SIZE)
def _pck_chain(chain):
    """(DER certificates leaf first, the leaf's tbsCertificate DER) of a PEM PCK chain (bytes)."""
    certs = tuple(_pem_certificates(chain))
    leaf = certs[0]
    tbs_start, _leaf_end = _der_sequence(leaf, 0, "PCK leaf certificate")
    _content_start, tbs_end = _der_sequence(leaf, tbs_start, "PCK leaf certificate's tbsCertificate")
    return certs, leaf[tbs_start:tbs_end]


def _pem_certificates(chain):
    """DER certificates from PEM text: CERTIFICATE blocks, ASCII whitespace around them, NULs at the end.

    Stricter than dcap-qvl's PEM reader (the pem crate: it skips any text before a BEGIN line and
    drops what follows a block it cannot delimit), so that when both read a chain, the first block
    here is the leaf dcap-qvl verifies.
    """
    text = chain.rstrip(b"\0")
    certs = []
    pos = 0
    while True:
        while pos < len(text) and text[pos] in PEM_WHITESPACE:
            pos += 1
        if pos == len(text):
            break
        where = f"byte {pos} of the PCK certificate chain"
        if not text.startswith(PEM_BEGIN, pos):
            raise QuoteError(f"has {text[pos:pos + 12]!r} at {where}, where a PEM CERTIFICATE block belongs")
        end = text.find(b"-----END ", pos + len(PEM_BEGIN))
        if end < 0 or not text.startswith(PEM_END, end):
            raise QuoteError(f"has a PEM block at {where} without its END CERTIFICATE line")
        body = text[pos + len(PEM_BEGIN):end].translate(None, PEM_WHITESPACE)
        if body.translate(None, _BASE64_ALPHABET):
            raise QuoteError(f"has a byte that is not base64 in the PEM block at {where}")
        try:
            der = base64.b64decode(body, validate=True)
        except ValueError:
            raise QuoteError(f"has bad base64 in the PEM block at {where}") from None
        if base64.b64encode(der) != body:
            raise QuoteError(f"has non-canonical base64 in the PEM block at {where}")
        _start, der_end = _der_sequence(der, 0, f"certificate at {where}")
        if der_end != len(der):
            raise QuoteError(f"has {len(der) - der_end} bytes after the certificate at {where}")
        certs.append(der)
        pos = end + len(PEM_END)
    if not certs:
        raise QuoteError("has a PCK certificate chain without a certificate")
    return certs


def _read(fmt, data, offset, what):
    size = struct.calcsize(fmt)
    if len(data) < offset + size:
        raise QuoteError(f"truncated in the {what} at offset {offset}")
    return struct.unpack_from(fmt, data, offset)


def parse_quote(data):
    """Parse a TDX quote (bytes). Raises QuoteError, and nothing else, on any malformed input."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise QuoteError(f"must be bytes, not {type(data).__name__}")
    data = bytes(data)
    if len(data) > MAX_QUOTE_SIZE:
        raise QuoteError(f"is {len(data)} bytes, more than the {MAX_QUOTE_SIZE} a quote may have")
    header = QuoteHeader.from_bytes(data)
    if header.version not in (4, 5):
        raise QuoteError(f"has version {header.version}; TDX quotes are version 4 or 5")
    if header.tee_type != TEE_TYPE_TDX:
        raise QuoteError(f"has TEE type {header.tee_type:#x}, not TDX ({TEE_TYPE_TDX:#x})")
    if header.attestation_key_type != ATTESTATION_KEY_ECDSA_P256:
        raise QuoteError(f"has attestation key type {header.attestation_key_type}, not ECDSA P-256 (2)")
    offset = QuoteHeader.SIZE
    body_type = BODY_TYPE_TD10
    report_cls = TdReport10
    if header.version == 5:
        body_type, body_size = _read("<HI", data, offset, "body descriptor")
        offset += 6
        report_cls = {BODY_TYPE_TD10: TdReport10, BODY_TYPE_TD15: TdReport15}.get(body_type)
        if report_cls is None:
            raise QuoteError(f"has body type {body_type}; a TDX quote has 2 (TD 1.0) or 3 (TD 1.5)")
        if body_size != report_cls.size():
            raise QuoteError(f"says its body is {body_size} bytes; a body of type {body_type} is {report_cls.size()}")
    report = report_cls.from_bytes(data, offset, "TD report")
    offset += report_cls.size()
    (auth_len,) = _read("<I", data, offset, "signature data length")
    offset += 4
    if len(data) < offset + auth_len:
        raise QuoteError(f"has {len(data) - offset} bytes of signature data where its length field says {auth_len}")
    end = offset + auth_len
    padding = data[end:]
    if padding.strip(b"\0"):
        first_nonzero = end + len(padding) - len(padding.lstrip(b"\0"))
        raise QuoteError(f"has {len(padding)} bytes after the {auth_len} bytes of signature data its length "
                         f"field declares, not all zero (byte {first_nonzero} is {data[first_nonzero]:#04x}); "
                         f"only zero padding may follow a quote")
    data = data[:end]
    if auth_len < 64 + 64 + 6:
        raise QuoteError(f"signature data of {auth_len} bytes is too short")
    signature = data[offset:offset + 64]
    attestation_key = data[offset + 64:offset + 128]
    offset += 128
    cert_type, cert_size = _read("<HI", data, offset, "certification data header")
    offset += 6
    if cert_type != CERT_TYPE_QE_REPORT:
        raise QuoteError(f"has certification data of type {cert_type}; TDX quotes carry type 6 (QE report)")
    if offset + cert_size != len(data):
        raise QuoteError(f"certification data says {cert_size} bytes, {len(data) - offset} are there")
    qe_report = SgxReportBody.from_bytes(data, offset, "QE report")
    offset += SgxReportBody.size()
    if len(data) < offset + 64:
        raise QuoteError(f"truncated in the QE report signature at offset {offset}")
    qe_report_signature = data[offset:offset + 64]
    offset += 64
    (auth_data_len,) = _read("<H", data, offset, "QE authentication data length")
    offset += 2
    if len(data) < offset + auth_data_len:
        raise QuoteError(f"truncated in the QE authentication data at offset {offset}")
    qe_auth_data = data[offset:offset + auth_data_len]
    offset += auth_data_len
    inner_type, inner_size = _read("<HI", data, offset, "PCK certification data header")
    offset += 6
    if offset + inner_size != len(data):
        raise QuoteError(f"PCK certification data says {inner_size} bytes, {len(data) - offset} are there")
    certification = QeCertificationData(qe_report, qe_report_signature, qe_auth_data, inner_type,
                                        data[offset:offset + inner_size])
    certification.pck_leaf_tbs()  # the chain is read here, so that what parses has an identity
    return Quote(header, report, signature, attestation_key, certification, body_type, data + padding,
                 padding)


def with_report(quote, **changes):
    """A copy of a parsed quote with TD report fields replaced (signatures left as they are)."""
    return replace(quote, report=replace(quote.report, **changes))

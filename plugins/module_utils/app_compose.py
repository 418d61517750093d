# -*- coding: utf-8 -*-
# Copyright: dstack.tee contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""app-compose.json: building it, its exact bytes, compose_hash, app_id, instance_id, mrconfigid.

dstack-reference sections 6.1, 6.2 and 2.5. compose_hash is SHA-256 of the exact bytes of
app-compose.json, so those bytes are made here and nowhere else: keys sorted recursively, compact
separators, UTF-8 without escaping, NaN and infinities as null, and top-level fields that are
None (or NaN or infinite) left out. These are the bytes `dstack_sdk.get_compose_hash` hashes.
"""

import hashlib
import json
import math
import re

from ansible_collections.dstack.tee.plugins.module_utils import json_limits
from ansible_collections.dstack.tee.plugins.module_utils.errors import DstackError, parse_hex
from ansible_collections.dstack.tee.plugins.module_utils.signatures import keccak

try:
    import yaml
except ImportError:  # PyYAML comes with ansible-core; reported by callers when missing
    yaml = None

KEY_PROVIDERS = ("none", "kms", "local", "tpm")
# The kind byte of mrconfigid v2 (dstack-reference 2.5).
KEY_PROVIDER_KIND_BYTE = {"none": 0, "local": 1, "kms": 2, "tpm": 3}
RUNNERS = ("docker-compose", "bash", "nerdctl-compose")
STORAGE_FS = ("zfs", "ext4")
ENV_KEY_RE = re.compile(r"\A[a-zA-Z_][a-zA-Z0-9_]*\Z")
# VM and app names: alphanumerics and -_. @~!$^() (dstack-reference 2.1).
NAME_RE = re.compile(r"\A[A-Za-z0-9\-_. @~!$^()]+\Z")
_HUMAN_SIZE_RE = re.compile(r"\A\s*(\d+)\s*([kKmMgGtT]?)(i?[bB])?\s*\Z")
_DNS_LABEL_RE = re.compile(r"\A[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\Z")
MAX_CUSTOM_DOMAINS = 32
CUSTOM_DOMAIN_PORT = 80      # where a terminated custom domain goes when its entry names no port

# Fields always written, with dstack's defaults (what `vmm-cli.py compose` writes, plus the
# explicit key_provider, which wins over the booleans). Order does not matter: keys are sorted.
DEFAULTS = {
    "manifest_version": 2,
    "runner": "docker-compose",
    "kms_enabled": True,
    "gateway_enabled": True,
    "local_key_provider_enabled": False,
    "key_provider": "kms",
    "key_provider_id": "",
    "public_logs": False,
    "public_sysinfo": False,
    "public_tcbinfo": True,
    "allowed_envs": [],
    "no_instance_id": False,
    "secure_time": True,
}
# Fields written only when set; when absent the guest applies dstack's default.
OPTIONAL_FIELDS = (
    "bash_script", "pre_launch_script", "init_script", "features", "storage_fs", "swap_size",
    "docker_config", "port_policy", "requirements", "verity_volumes", "event_log_version",
    # Ours, not dstack's: the names the gateway terminates with their own certificates (below).
    "custom_domains",
)
BOOL_FIELDS = (
    "kms_enabled", "gateway_enabled", "local_key_provider_enabled", "public_logs",
    "public_sysinfo", "public_tcbinfo", "no_instance_id", "secure_time",
)
FIELDS = ("name", "docker_compose_file") + tuple(DEFAULTS) + OPTIONAL_FIELDS


# ---- exact bytes and hashes -----------------------------------------------------------------

def _canonical(value):
    if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
        return None
    if isinstance(value, dict):
        return {str(k): _canonical(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_canonical(v) for v in value]
    return value


def render(app_compose):
    """The exact bytes of app-compose.json for a dict (deterministic)."""
    if not isinstance(app_compose, dict):
        raise DstackError("app_compose", f"must be a mapping, not {type(app_compose).__name__}")
    top = {k: v for k, v in app_compose.items() if _canonical(v) is not None}
    text = json.dumps(_canonical(top), sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False)
    return text.encode("utf-8")


def compose_hash(app_compose_bytes):
    """compose_hash: SHA-256 hex of the exact bytes of app-compose.json."""
    if isinstance(app_compose_bytes, dict):
        app_compose_bytes = render(app_compose_bytes)
    return hashlib.sha256(app_compose_bytes).hexdigest()


def app_id_for(compose_hash_hex, app_id=None):
    """app_id (40 hex, no 0x): the given one (e.g. a DstackApp contract address) or compose_hash[0:20]."""
    if app_id:
        return parse_hex(app_id, "app_id", length=20).hex()
    return parse_hex(compose_hash_hex, "compose_hash", length=32)[:20].hex()


def instance_id_for(instance_id_seed, app_id):
    """instance_id = SHA-256(seed(20) || app_id(20))[0:20], hex."""
    seed = parse_hex(instance_id_seed, "instance_id_seed", length=20)
    app = parse_hex(app_id, "app_id", length=20)
    return hashlib.sha256(seed + app).digest()[:20].hex()


def mrconfigid_v1(compose_hash_hex):
    """48 bytes: 0x01 || compose_hash || zeros."""
    return (b"\x01" + parse_hex(compose_hash_hex, "compose_hash", length=32)).ljust(48, b"\x00")


def mrconfigid_v2(compose_hash_hex, app_id, key_provider, key_provider_id):
    """48 bytes: 0x02 || keccak256(compose_hash || app_id || kind byte || key_provider_id) || zeros."""
    if key_provider not in KEY_PROVIDER_KIND_BYTE:
        raise DstackError("key_provider", _unknown(key_provider, KEY_PROVIDERS))
    digest = keccak(parse_hex(compose_hash_hex, "compose_hash", length=32)
                    + parse_hex(app_id, "app_id", length=20)
                    + bytes([KEY_PROVIDER_KIND_BYTE[key_provider]])
                    + parse_hex(key_provider_id or "", "key_provider_id", allow_empty=True))
    return (b"\x02" + digest).ljust(48, b"\x00")


def mrconfigid(app_compose, app_id):
    """The mrconfigid the VMM sets for an app: v2 when key_provider_id is set, else v1."""
    chash = compose_hash(app_compose)
    kp_id = app_compose.get("key_provider_id") or ""
    if kp_id:
        return mrconfigid_v2(chash, app_id, key_provider_of(app_compose), kp_id)
    return mrconfigid_v1(chash)


# ---- reading and building -------------------------------------------------------------------

def key_provider_of(app_compose):
    """The effective key provider: `key_provider` wins, then kms_enabled, then the local provider."""
    kp = app_compose.get("key_provider")
    if kp:
        if kp not in KEY_PROVIDERS:
            raise DstackError("key_provider", _unknown(kp, KEY_PROVIDERS))
        return kp
    if app_compose.get("kms_enabled"):
        return "kms"
    if app_compose.get("local_key_provider_enabled"):
        return "local"
    return "none"


def diff_text(app_compose_bytes):
    """app-compose.json as a person reads a change to it: YAML, one field a line, keys sorted, and the
    docker-compose text (any text of several lines: scripts too) as its own lines in a block, exactly
    as written, not one escaped JSON string. For diffs only (the bytes hashed are render()'s).
    Bytes that are not an app-compose are shown as text."""
    if not app_compose_bytes:
        return ""
    if isinstance(app_compose_bytes, str):
        app_compose_bytes = app_compose_bytes.encode("utf-8")
    try:
        doc = parse(app_compose_bytes)
    except DstackError:
        return app_compose_bytes.decode("utf-8", "replace")
    lines = []
    for key in sorted(doc):
        value = doc[key]
        if isinstance(value, str) and "\n" in value.rstrip("\n"):
            # The lines themselves, trailing spaces and all (a YAML dumper would quote such text).
            lines.append(f"{key}: |" + ("" if value.endswith("\n") else "-"))
            lines.extend(f"  {line}" if line else "" for line in value.rstrip("\n").split("\n"))
        elif yaml is not None:
            # Wide: a long value stays one line of the diff.
            lines.extend(yaml.safe_dump({key: value}, default_flow_style=False, allow_unicode=True,
                                        width=1 << 16).splitlines())
        else:
            lines.append(f"{key}: {json.dumps(value, sort_keys=True, ensure_ascii=False)}")
    return "\n".join(lines) + "\n"


def parse(app_compose_bytes, field="app-compose.json"):
    """Parse app-compose.json bytes into a dict, with an error naming the field on bad input."""
    data = json_limits.loads(app_compose_bytes, field)
    if not isinstance(data, dict):
        raise DstackError(field, "must be a JSON object")
    return data


def load_yaml(text, field):
    """YAML text (PyYAML's safe loader) as data; DstackError naming the field, the line and column, and
    the parser's reason when it does not parse (the docker-compose text, an app folder's app.yml)."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise DstackError(field, f"is not valid YAML{where}: {problem}") from None


def parse_compose_yaml(text, field="compose"):
    """Check that docker-compose text is a YAML mapping with a `services` mapping; return it."""
    if yaml is None:
        raise DstackError(field, "cannot be checked: PyYAML is not installed")
    if not isinstance(text, str) or not text.strip():
        raise DstackError(field, "is empty")
    doc = load_yaml(text, field)
    if not isinstance(doc, dict):
        raise DstackError(field, "must be a YAML mapping (a docker-compose file)")
    services = doc.get("services")
    if not isinstance(services, dict) or not services:
        raise DstackError(field, "has no `services` mapping: a docker-compose file needs at least one service")
    for svc_name, svc in services.items():
        if not isinstance(svc, dict):
            raise DstackError(field, f"service {svc_name!r} must be a mapping")
    return doc


def parse_size(value, field):
    """Bytes from an int or a human size ('2G', '512MiB', '1024k')."""
    if isinstance(value, bool):
        raise DstackError(field, "must be a size in bytes or like '2G'")
    if isinstance(value, int):
        if value < 0:
            raise DstackError(field, "must not be negative")
        return value
    match = _HUMAN_SIZE_RE.match(str(value))
    if not match:
        raise DstackError(field, "must be a size in bytes or like '2G', '512M', '1GiB'")
    unit = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}[match.group(2).lower()]
    return int(match.group(1)) * unit


def _unknown(value, allowed):
    return f"unknown value {str(value)[:40]!r} (expected one of {', '.join(allowed)})"


def validate(app_compose):
    """Check an app-compose dict field by field; raise DstackError naming the first bad field."""
    if not isinstance(app_compose, dict):
        raise DstackError("app_compose", "must be a mapping")
    name = app_compose.get("name")
    if not isinstance(name, str) or not name:
        raise DstackError("name", "is required (a non-empty string)")
    if not NAME_RE.match(name):
        raise DstackError("name", "may hold only letters, digits, spaces and -_.@~!$^()")
    mv = app_compose.get("manifest_version")
    if isinstance(mv, bool) or not (isinstance(mv, int) and mv in (1, 2)
                                    or isinstance(mv, str) and mv.isdigit()):
        raise DstackError("manifest_version", "must be 1 or 2, or a numeric string such as \"3\"")
    runner = app_compose.get("runner")
    if runner not in RUNNERS:
        raise DstackError("runner", _unknown(runner, RUNNERS))
    if runner in ("docker-compose", "nerdctl-compose"):
        parse_compose_yaml(app_compose.get("docker_compose_file"), "docker_compose_file")
    elif not app_compose.get("bash_script"):
        raise DstackError("bash_script", "is required when runner is bash")
    for field in BOOL_FIELDS:
        if field in app_compose and app_compose[field] is not None and not isinstance(app_compose[field], bool):
            raise DstackError(field, "must be true or false")
    kp = app_compose.get("key_provider")
    if kp is not None:
        if kp not in KEY_PROVIDERS:
            raise DstackError("key_provider", _unknown(kp, KEY_PROVIDERS))
        if app_compose.get("kms_enabled") and kp != "kms":
            raise DstackError("kms_enabled", f"is true but key_provider is {kp!r}")
        if app_compose.get("local_key_provider_enabled") and kp != "local":
            raise DstackError("local_key_provider_enabled", f"is true but key_provider is {kp!r}")
    if app_compose.get("key_provider_id"):
        parse_hex(app_compose["key_provider_id"], "key_provider_id")
    allowed = app_compose.get("allowed_envs") or []
    if not isinstance(allowed, list):
        raise DstackError("allowed_envs", "must be a list of variable names")
    for key in allowed:
        if not isinstance(key, str) or not ENV_KEY_RE.match(key) or len(key.encode()) > 255:
            raise DstackError("allowed_envs", f"{str(key)[:64]!r} is not a valid variable name "
                              "(letters, digits and _, not starting with a digit, at most 255 bytes)")
    if len(set(allowed)) != len(allowed):
        raise DstackError("allowed_envs", "lists a name twice")
    if app_compose.get("storage_fs") is not None and app_compose["storage_fs"] not in STORAGE_FS:
        raise DstackError("storage_fs", _unknown(app_compose["storage_fs"], STORAGE_FS))
    if app_compose.get("swap_size") is not None:
        parse_size(app_compose["swap_size"], "swap_size")
    for field in ("docker_config", "port_policy", "requirements"):
        if app_compose.get(field) is not None and not isinstance(app_compose[field], dict):
            raise DstackError(field, "must be a mapping")
    if app_compose.get("custom_domains") is not None:
        custom_domains(app_compose)
    init = app_compose.get("init_script")
    if init is not None and not (isinstance(init, str) or isinstance(init, list) and len(init) <= 5
                                 and all(isinstance(s, str) for s in init)):
        raise DstackError("init_script", "must be a script or a list of at most 5 scripts")
    return app_compose


# ---- custom_domains (ours) -------------------------------------------------------------------

def check_domain(value, field):
    """A DNS name a certificate can be issued for: lower case, letters, digits and - in labels of
    at most 63, at least two labels, no wildcard, no IP address; the trailing dot dropped."""
    if not isinstance(value, str) or not value.strip():
        raise DstackError(field, "must be a DNS name such as shop.example.com")
    name = value.strip().lower().removesuffix(".")
    if name.startswith("*."):
        raise DstackError(field, f"{name!r} is a wildcard: declare each name (a certificate per name)")
    labels = name.split(".")
    if len(name) > 253 or len(labels) < 2 or not all(_DNS_LABEL_RE.match(label) for label in labels) \
            or labels[-1].isdigit():
        raise DstackError(field, f"{value[:80]!r} is not a DNS name (labels of letters, digits and -, at least two, "
                                 "not an IP address)")
    return name


def custom_domains(app_compose, field="custom_domains"):
    """app-compose's custom_domains as [{"domain", "port"}]: the names the app asks the gateway to
    terminate with their own ACME certificates, and the app's port each goes to (plain, after the
    gateway's TLS; CUSTOM_DOMAIN_PORT when not given). Entries are {domain, port} or a bare name.
    The field is ours, not dstack's, and written only when set: an app without it keeps dstack's
    compose_hash. The gateway serves a name only while its TXT record
    _dstack-app-address.<domain> says "<app_id>:<port>" of this app (agents/gateway/custom_certs.py)."""
    entries = app_compose.get(field) if isinstance(app_compose, dict) else None
    if entries is None:
        return []
    if not isinstance(entries, list) or len(entries) > MAX_CUSTOM_DOMAINS:
        raise DstackError(field, f"must be a list of at most {MAX_CUSTOM_DOMAINS} {{domain, port}} (or names)")
    checked, seen = [], set()
    for pos, entry in enumerate(entries):
        where = f"{field}[{pos}]"
        if isinstance(entry, str):
            entry = {"domain": entry}
        if not isinstance(entry, dict):
            raise DstackError(where, "must be {domain: NAME, port: PORT} (port optional) or a name")
        unknown = sorted(str(k) for k in entry if k not in ("domain", "port"))
        if unknown:
            raise DstackError(f"{where}.{unknown[0]}", "is not a custom_domains field (domain, port)")
        domain = check_domain(entry.get("domain"), f"{where}.domain")
        port = entry.get("port", CUSTOM_DOMAIN_PORT)
        if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
            raise DstackError(f"{where}.port", f"must be a port number 1 to 65535 (got {str(port)[:40]!r})")
        if domain in seen:
            raise DstackError(f"{where}.domain", f"{domain} is declared twice")
        seen.add(domain)
        checked.append({"domain": domain, "port": port})
    return checked


# An app folder's app.yml: every app-compose field a deployer sets (all but name, which app.yml
# gives as `name`, and the compose text), plus what roles/app reads itself: `name` (the app's and
# its CVM's name), `ports` (the VM's port map) and `images` (shipped to the VMM host: app_folder).
# Anything else is refused, naming it.
APP_YML_FIELDS = tuple(f for f in FIELDS if f not in ("name", "docker_compose_file"))
APP_YML_OWN_KEYS = ("name", "ports", "images", "replicas", "hosts", "app_id")


def app_yml_options(text, field="app.yml"):
    """(name or None, build options) from an app folder's app.yml text ("" or None: no file): the
    one reading of app.yml (the app_compose module's app_yml option, which roles/app uses, and verify_app)."""
    if not text or not text.strip():
        return None, {}
    if yaml is None:
        raise DstackError(field, "cannot be read: PyYAML is not installed")
    spec = load_yaml(text, field)
    if spec is None:
        return None, {}
    if not isinstance(spec, dict):
        raise DstackError(field, "must be a YAML mapping of app options")
    unknown = sorted(str(k) for k in spec if k not in APP_YML_FIELDS and k not in APP_YML_OWN_KEYS)
    if unknown:
        raise DstackError(unknown[0], f"in {field} is not an app-compose field "
                                      "(nor name, ports, images, replicas, hosts or app_id)")
    name = spec.get("name")
    if name is not None and not isinstance(name, str):
        raise DstackError(field, "its name must be a string")
    return name, {k: spec[k] for k in APP_YML_FIELDS if spec.get(k) is not None}


def build(compose_text, name, **options):
    """An app-compose dict from docker-compose text plus options; None options take dstack's defaults.

    The key-provider booleans follow `key_provider` so that old and new guests read the same
    provider. Raises DstackError naming the first bad field.
    """
    unknown = sorted(set(options) - set(FIELDS))
    if unknown:
        raise DstackError(unknown[0], "is not an app-compose field")
    app = dict(DEFAULTS)
    app["name"] = name
    app["docker_compose_file"] = compose_text
    for field, value in options.items():
        if value is not None:
            app[field] = value
    if "custom_domains" in app:
        # Written in one form ({domain, port}, the name in lower case), or not at all when empty:
        # an app that declares none keeps the compose_hash it has without the field.
        declared = custom_domains(app)
        if declared:
            app["custom_domains"] = declared
        else:
            del app["custom_domains"]
    if options.get("key_provider") is not None:
        kp = options["key_provider"]
        if kp not in KEY_PROVIDERS:
            raise DstackError("key_provider", _unknown(kp, KEY_PROVIDERS))
        if options.get("kms_enabled") is None:
            app["kms_enabled"] = kp == "kms"
        if options.get("local_key_provider_enabled") is None:
            app["local_key_provider_enabled"] = kp == "local"
    elif options.get("kms_enabled") is False or options.get("local_key_provider_enabled"):
        # Booleans given without key_provider: derive it from them, as dstack does.
        app["key_provider"] = key_provider_of({k: v for k, v in app.items() if k != "key_provider"})
    if app.get("runner") == "bash":
        app.pop("docker_compose_file", None)
    return validate(app)

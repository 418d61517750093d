# Copyright: dstack.tee contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Gateway configuration: a gateway.toml, then DSTACK_GATEWAY_* environment variables, then
overrides; every key checked at start, errors name the key (never a secret's value).

dstack's keys where they exist (dstack-reference 3; durations as "5s", "10m", "5h" or seconds):

    [core]              kms_url, state_dir (required: the SQLite state), rpc_domain
    [core.wg]           private_key (base64; or public_key alone: the control plane needs only
                        the public half), public_key, ip ("10.0.0.1/24"), reserved_net (list),
                        client_ip_range ("10.0.0.0/25"), listen_port, interface, endpoint (required:
                        the HOST:PORT CVMs reach the gateway's WireGuard on); ours: netns (the
                        interface in this network namespace, made when missing, while its UDP
                        port and the gateway's listeners stay in serve's: the CVMs' tunnel
                        addresses are then reachable only through the gateway)
    [core.proxy]        listen_addr, listen_port, external_port, base_domain, agent_port,
                        connect_top_n, max_connections_per_app (per routed id), app_address_ns_prefix
                        (custom domains' TXT label; "" turns them off), app_address_ns_compat (also
                        _tapp-address), cert_chain, cert_key, inbound_pp_enabled, workers; ours:
                        dns_resolver (the resolvers custom domains' TXT records are asked of, "IP[:PORT]",
                        a list; default the system's /etc/resolv.conf)
    [core.proxy.timeouts] connect, handshake, idle, total, write, shutdown, cache_top_n, dns_resolve
    [core.recycle]      enabled, interval, timeout
    [core.auth]         enabled, url, timeout (the authorization webhook; fails closed)
    [core.certbot]      the wildcard certificate by ACME DNS-01 through certbot (agents/gateway/acme.py):
                        enabled, acme_url (the ACME directory), domain (the certificate is for
                        *.<domain> and <domain>; default core.proxy.base_domain, "*." accepted),
                        renew_interval (how often expiry is checked), renew_before_expiration,
                        renew_timeout (one certbot run); ours: email ("" = none), acme_ca_bundle
                        (the ACME server's CA, a private one's), dns_provider ("rfc2136" or
                        "cloudflare"), credentials (that certbot plugin's INI file, 0600: the secret
                        stays out of gateway.toml), dns_propagation_seconds, ca_name (the CAA
                        records' issuer, dstack's letsencrypt.org), custom_domain_certs (the
                        custom domains apps declare in their app-compose terminated with their own
                        certificates, while their TXT record names the app: custom_certs.py; true)
    [core.sync]         a gateway cluster (dstack's section; its store is etcd here, not WaveKV):
                        etcd_endpoints (the etcd members' client URLs; empty, the default, = one
                        node on SQLite), node_id (unique in the cluster; 0 = the host part of
                        core.wg.ip, which the cluster keeps unique), my_url (the control API's URL
                        for the other nodes and the CVMs; "" = from rpc_domain or rpc.listen),
                        interval (how often a node renews its lease and takes the others'
                        registrations into its WireGuard hub), node_ttl (a node that has not
                        renewed for this long is down), timeout (one etcd request), etcd_prefix,
                        etcd_ca_cert, etcd_cert, etcd_key (TLS to etcd, client certificate)
    [admin]             listen ("" = no Admin API), token (required with listen)
Ours (what dstack gets from its own CVM boot):
    [rpc]               listen (the control API, mutual TLS), cert, key (the gateway's TLS
                        certificate), guest_agent (instead of cert and key: the socket of the
                        guest agent of the gateway's own CVM, asked at start for an RA-TLS
                        certificate the KMS signs, so CVMs can check the gateway's attested app
                        id; cert_names: its DNS names), kms_root_ca (the KMS root CA that client certificates must chain to:
                        the KMS's root-ca.crt, pinned), workers
    [attestation]       mode ("production" | "simulation"), sim_state_dir, root_ca, collateral,
                        pccs_url, collateral_cache_dir, allowed_tcb_statuses, allowed_advisory_ids
                        (as the KMS's keys: how the quote in a client certificate is verified)

Environment: DSTACK_GATEWAY_<SECTION>_<KEY>, the TOML path joined by "_" in capitals, e.g.
DSTACK_GATEWAY_CORE_WG_PRIVATE_KEY, DSTACK_GATEWAY_CORE_PROXY_TIMEOUTS_CONNECT,
DSTACK_GATEWAY_ADMIN_TOKEN; lists are comma-separated.
"""

import ipaddress
import os
import re

from ansible_collections.dstack.tee.agents.gateway import custom_domains
from ansible_collections.dstack.tee.plugins.module_utils import wireguard
from ansible_collections.dstack.tee.plugins.module_utils.errors import DstackError
from ansible_collections.dstack.tee.plugins.module_utils.fileio import read_toml

REQUIRED = object()
_DURATION_RE = re.compile(r"\A\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*\Z")
_DURATION_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, None: 1}
_DNS_LABEL_RE = re.compile(r"\A(?!-)[a-z0-9-]{1,63}(?<!-)\Z")
MODES = ("production", "simulation")
DNS_PROVIDERS = ("rfc2136", "cloudflare")   # agents/gateway/dns_provider.py


# ---- one checker per kind of value: (value, key) -> the normalized value ---------------------

def _netns(value, key):
    text = _text(value, key)
    return wireguard.check_netns_name(text, key) if text else text


def _text(value, key):
    if not isinstance(value, str):
        raise DstackError(key, f"must be a string, not {type(value).__name__}")
    return value.strip()


def _bool(value, key):
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
        return value.strip().lower() in ("true", "1", "yes", "on")
    raise DstackError(key, "must be true or false")


def _int(low, high):
    def check(value, key):
        if isinstance(value, str) and value.strip().isdigit():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise DstackError(key, f"must be a whole number from {low} to {high}")
        return value
    return check


_port = _int(1, 65535)


def _duration(value, key):
    """Seconds (float) from a number or dstack's "500ms", "5s", "10m", "5h", "1d"."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0:
        return float(value)
    match = _DURATION_RE.match(value) if isinstance(value, str) else None
    if not match:
        raise DstackError(key, "must be a duration: seconds, or a number with ms, s, m, h or d (\"5s\", \"10m\")")
    return float(match.group(1)) * _DURATION_UNITS[match.group(2)]


def _list_of(check):
    def checked(value, key):
        if isinstance(value, str):
            value = [v for v in (p.strip() for p in value.split(",")) if v]
        if not isinstance(value, list):
            raise DstackError(key, "must be a list")
        return [check(v, f"{key}[{i}]") for i, v in enumerate(value)]
    return checked


def _ipv4_network(value, key):
    try:
        net = ipaddress.ip_network(_text(value, key), strict=True)
    except ValueError:
        raise DstackError(key, "must be an IPv4 network in CIDR form (10.0.0.0/25), its host bits zero") from None
    if net.version != 4:
        raise DstackError(key, "must be an IPv4 network (WireGuard client addresses are /32s)")
    return str(net)


def _ipv4_interface(value, key):
    try:
        iface = ipaddress.ip_interface(_text(value, key))
    except ValueError:
        raise DstackError(key, "must be an IPv4 address with its prefix (10.0.0.1/24)") from None
    if iface.version != 4 or "/" not in value:
        raise DstackError(key, "must be an IPv4 address with its prefix (10.0.0.1/24)")
    return str(iface)


def _host_port(value, key, allow_empty=False):
    text = _text(value, key)
    if not text and allow_empty:
        return ""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise DstackError(key, "must be HOST:PORT")
    return text


def _listen(value, key):
    return _host_port(value, key, allow_empty=True)


def _wg_key(value, key):
    """A WireGuard key: base64 of 32 bytes (wg's format). The error never shows the value."""
    text = _text(value, key)
    if text:
        wireguard.parse_key(text, key)
    return text


def _domain(value, key):
    text = _text(value, key).lower().rstrip(".")
    if not text or len(text) > 253 or not all(_DNS_LABEL_RE.match(p) for p in text.split(".")):
        raise DstackError(key, "must be a DNS name (ASCII letters, digits, - and dots)")
    return text


def _url(value, key):
    text = _text(value, key)
    if text and not text.startswith(("http://", "https://")):
        raise DstackError(key, "must be an http:// or https:// URL")
    return text


def _ns_prefix(value, key):
    return custom_domains.check_prefix(_text(value, key), key)


def _nameserver(value, key):
    ip, port = custom_domains.parse_nameserver(_text(value, key), key)
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


def _etcd_url(value, key):
    """An etcd member's client URL: http(s)://HOST:PORT (HOST:PORT alone means http)."""
    text = _text(value, key)
    if "://" not in text:
        text = "http://" + text
    scheme, _sep, rest = text.partition("://")
    if scheme not in ("http", "https") or "/" in rest.rstrip("/"):
        raise DstackError(key, "must be an etcd client URL: http(s)://HOST:PORT")
    _host_port(rest.rstrip("/"), key)
    return f"{scheme}://{rest.rstrip('/')}"


def _etcd_prefix(value, key):
    text = _text(value, key)
    if not text.startswith("/") or not text.endswith("/") or len(text) < 3:
        raise DstackError(key, "must be a key prefix that starts and ends with / (\"/dstack-gateway/\")")
    return text


def _dns_provider(value, key):
    text = _text(value, key)
    if text not in DNS_PROVIDERS:
        raise DstackError(key, f"must be {' or '.join(DNS_PROVIDERS)}")
    return text


def _mode(value, key):
    text = _text(value, key)
    if text not in MODES:
        raise DstackError(key, f"must be {' or '.join(MODES)}")
    return text


# ---- the schema: dstack's sections and defaults, and ours ------------------------------------

SCHEMA = {
    "core": {
        "kms_url": (_url, ""),
        "state_dir": (_text, REQUIRED),
        "rpc_domain": (_text, ""),
        "wg": {
            "private_key": (_wg_key, ""),
            "public_key": (_wg_key, ""),
            "ip": (_ipv4_interface, "10.0.0.1/24"),
            "reserved_net": (_list_of(_ipv4_network), ["10.0.0.1/32"]),
            "client_ip_range": (_ipv4_network, "10.0.0.0/25"),
            "listen_port": (_port, 51820),
            "interface": (_text, "wg0"),
            "endpoint": (_host_port, REQUIRED),
            "config_path": (_text, ""),
            "netns": (_netns, ""),
        },
        "proxy": {
            "listen_addr": (_text, "0.0.0.0"),
            "listen_port": (_port, 8443),
            "external_port": (_port, 443),
            "base_domain": (_domain, "app.localhost"),
            "agent_port": (_port, 8090),
            "connect_top_n": (_int(1, 64), 3),
            "max_connections_per_app": (_int(0, 10_000_000), 2000),
            "app_address_ns_prefix": (_ns_prefix, "_dstack-app-address"),
            "app_address_ns_compat": (_bool, True),
            "dns_resolver": (_list_of(_nameserver), []),
            "cert_chain": (_text, ""),
            "cert_key": (_text, ""),
            "inbound_pp_enabled": (_bool, False),
            "workers": (_int(0, 1024), 0),
            "timeouts": {
                "connect": (_duration, "5s"),
                "handshake": (_duration, "5s"),
                "idle": (_duration, "10m"),
                "total": (_duration, "5h"),
                "write": (_duration, "5s"),
                "shutdown": (_duration, "5s"),
                "cache_top_n": (_duration, "30s"),
                "dns_resolve": (_duration, "5s"),
            },
        },
        "recycle": {
            "enabled": (_bool, True),
            "interval": (_duration, "5m"),
            "timeout": (_duration, "10h"),
        },
        "auth": {
            "enabled": (_bool, False),
            "url": (_url, ""),
            "timeout": (_duration, "5s"),
        },
        "certbot": {
            "enabled": (_bool, False),
            "acme_url": (_url, "https://acme-v02.api.letsencrypt.org/directory"),
            "acme_ca_bundle": (_text, ""),
            "email": (_text, ""),
            "domain": (_text, ""),
            "renew_interval": (_duration, "1h"),
            "renew_before_expiration": (_duration, "30d"),
            "renew_timeout": (_duration, "300s"),
            "dns_provider": (_dns_provider, "rfc2136"),
            "credentials": (_text, ""),
            "dns_propagation_seconds": (_int(0, 3600), 60),
            "ca_name": (_text, "letsencrypt.org"),
            "custom_domain_certs": (_bool, True),
        },
        "sync": {
            "etcd_endpoints": (_list_of(_etcd_url), []),
            "etcd_prefix": (_etcd_prefix, "/dstack-gateway/"),
            "etcd_ca_cert": (_text, ""),
            "etcd_cert": (_text, ""),
            "etcd_key": (_text, ""),
            "node_id": (_int(0, 2**31 - 1), 0),
            "my_url": (_url, ""),
            "interval": (_duration, "5s"),
            "node_ttl": (_duration, "15s"),
            "timeout": (_duration, "2s"),
        },
    },
    "rpc": {
        "listen": (_listen, "127.0.0.1:8010"),
        "cert": (_text, ""),
        "key": (_text, ""),
        "guest_agent": (_text, ""),
        "cert_names": (_list_of(_text), []),
        "kms_root_ca": (_text, REQUIRED),
        "workers": (_int(1, 64), 2),
    },
    "attestation": {
        "mode": (_mode, "production"),
        "sim_state_dir": (_text, ""),
        "root_ca": (_text, ""),
        "collateral": (_text, ""),
        "pccs_url": (_url, ""),
        "collateral_cache_dir": (_text, ""),
        "allowed_tcb_statuses": (_list_of(_text), ["UpToDate"]),
        "allowed_advisory_ids": (_list_of(_text), []),
    },
    "admin": {
        "listen": (_listen, ""),
        "token": (_text, ""),
    },
}

SECRET_KEYS = {"core.wg.private_key", "admin.token"}
MIN_ADMIN_TOKEN = 16


def env_name(key):
    """The environment variable of a dotted key: core.wg.ip -> DSTACK_GATEWAY_CORE_WG_IP."""
    return "DSTACK_GATEWAY_" + key.replace(".", "_").upper()


def _leaves(schema, prefix=""):
    for name, entry in schema.items():
        key = f"{prefix}{name}"
        if isinstance(entry, dict):
            yield from _leaves(entry, key + ".")
        else:
            yield key, entry


def _normalize(raw, schema, prefix, environ):
    if not isinstance(raw, dict):
        raise DstackError(prefix.rstrip(".") or "config", "must be a table")
    unknown = sorted(set(raw) - set(schema))
    if unknown:
        raise DstackError(f"{prefix}{unknown[0]}", "is not a gateway.toml key (see agents/gateway/config.py)")
    out = {}
    for name, entry in schema.items():
        key = f"{prefix}{name}"
        if isinstance(entry, dict):
            out[name] = _normalize(raw.get(name, {}), entry, key + ".", environ)
            continue
        check, default = entry
        value = environ.get(env_name(key), raw.get(name, default))
        if value is REQUIRED:
            raise DstackError(key, f"is required (in the config file or {env_name(key)})")
        out[name] = check(value, key)
    return out


def _set(tree, key, value):
    *path, last = key.split(".")
    for name in path:
        tree = tree.setdefault(name, {})
    tree[last] = value


def load_config(path=None, environ=None, overrides=None):
    """The checked configuration (a nested dict shaped as gateway.toml, every key present).

    overrides: {dotted key: value}, applied over the file and the environment (the command's flags).
    """
    raw = read_toml(path) if path else {}
    known = dict(_leaves(SCHEMA))
    for key, value in (overrides or {}).items():
        if key not in known:
            raise DstackError(key, "is not a gateway.toml key")
        if value is not None:
            _set(raw, key, value)
    config = _normalize(raw, SCHEMA, "", os.environ if environ is None else environ)
    _check(config)
    return config


def _check(config):
    """What holds across keys (checked once, at start)."""
    core, wg = config["core"], config["core"]["wg"]
    core["state_dir"] = os.path.abspath(core["state_dir"]) if core["state_dir"] else ""
    if not core["state_dir"]:
        raise DstackError("core.state_dir", "must not be empty")
    if not wg["private_key"] and not wg["public_key"]:
        raise DstackError("core.wg.private_key", "is required (or core.wg.public_key: the gateway's WireGuard key)")
    derived = wireguard.public_key(wg["private_key"], "core.wg.private_key") if wg["private_key"] else ""
    if wg["public_key"] and derived and wg["public_key"] != derived:
        raise DstackError("core.wg.public_key", "is not the public half of core.wg.private_key")
    wg["public_key"] = wg["public_key"] or derived
    client_range = ipaddress.ip_network(wg["client_ip_range"])
    if not list(_first_hosts(client_range)):
        raise DstackError("core.wg.client_ip_range", "has no host address")
    auth = core["auth"]
    if auth["enabled"] and not auth["url"]:
        raise DstackError("core.auth.url", "is required when core.auth.enabled is true")
    _check_sync(core)
    _check_certbot(config)
    admin = config["admin"]
    if admin["listen"]:
        if len(admin["token"]) < MIN_ADMIN_TOKEN:
            raise DstackError("admin.token", f"is required with admin.listen: at least {MIN_ADMIN_TOKEN} characters")
        if config["rpc"]["listen"] and admin["listen"].rpartition(":")[2] == config["rpc"]["listen"].rpartition(":")[2]:
            raise DstackError("admin.listen", "must use another port than rpc.listen (the Admin API has its own listener)")
    att = config["attestation"]
    if att["mode"] == "production":
        if att["sim_state_dir"] or att["root_ca"]:
            raise DstackError("attestation.mode", "production trusts Intel's SGX Root CA only: remove "
                                                  "attestation.sim_state_dir and attestation.root_ca")
        if not att["collateral"] and not att["pccs_url"]:
            raise DstackError("attestation.pccs_url", "is required in production (or attestation.collateral, a file)")
    elif not att["sim_state_dir"] and not att["root_ca"]:
        raise DstackError("attestation.sim_state_dir", "simulation mode needs the simulator's state directory "
                                                       "(or attestation.root_ca)")
    if not att["allowed_tcb_statuses"]:
        raise DstackError("attestation.allowed_tcb_statuses", "must name at least one TCB status")
    if not os.path.isfile(config["rpc"]["kms_root_ca"]):
        raise DstackError("rpc.kms_root_ca", f"{config['rpc']['kms_root_ca']} is not a file (the KMS's root-ca.crt)")
    if bool(config["rpc"]["cert"]) != bool(config["rpc"]["key"]):
        raise DstackError("rpc.key" if config["rpc"]["cert"] else "rpc.cert", "rpc.cert and rpc.key go together")
    if config["rpc"]["guest_agent"] and config["rpc"]["cert"]:
        raise DstackError("rpc.guest_agent", "and rpc.cert exclude each other: the certificate comes either from the "
                                             "gateway's guest agent (attested) or from the files")


def _check_certbot(config):
    """[core.certbot]: what ACME needs, checked once at start (the credentials file's content when
    it is opened: agents/gateway/dns_provider.py)."""
    certbot = config["core"]["certbot"]
    base = config["core"]["proxy"]["base_domain"]
    certbot["domain"] = _domain(certbot["domain"].removeprefix("*."), "core.certbot.domain") if certbot["domain"] else base
    if certbot["domain"] != base and not certbot["domain"].endswith("." + base):
        raise DstackError("core.certbot.domain", f"must be core.proxy.base_domain ({base}) or a name under it")
    if not certbot["enabled"]:
        return
    if not certbot["acme_url"]:
        raise DstackError("core.certbot.acme_url", "is required with core.certbot.enabled (the ACME directory URL)")
    if not certbot["credentials"]:
        raise DstackError("core.certbot.credentials", f"is required with core.certbot.enabled: the {certbot['dns_provider']} "
                                                      "credentials file (0600)")
    if not os.path.isfile(certbot["credentials"]):
        raise DstackError("core.certbot.credentials", f"{certbot['credentials']} is not a file")
    if certbot["acme_ca_bundle"] and not os.path.isfile(certbot["acme_ca_bundle"]):
        raise DstackError("core.certbot.acme_ca_bundle", f"{certbot['acme_ca_bundle']} is not a file")
    if not config["rpc"]["guest_agent"]:
        raise DstackError("rpc.guest_agent", "is required with core.certbot.enabled: the ACME account and every "
                                             "certificate key are quoted by the gateway CVM's guest agent")
    if certbot["renew_interval"] <= 0 or certbot["renew_timeout"] <= 0:
        raise DstackError("core.certbot.renew_interval", "and core.certbot.renew_timeout must be more than 0")


def _check_sync(core):
    """[core.sync]: a cluster's node id (by default the host part of the hub address, unique in a
    cluster because the store gives each address to one node) and its timings."""
    sync = core["sync"]
    if not sync["etcd_endpoints"]:
        return
    if not sync["node_id"]:
        hub = ipaddress.ip_interface(core["wg"]["ip"])
        sync["node_id"] = int(hub.ip) & int(hub.network.hostmask)
        if not sync["node_id"]:
            raise DstackError("core.sync.node_id", "is required: core.wg.ip has no host part to take it from")
    if sync["interval"] <= 0 or sync["node_ttl"] < 2 * sync["interval"]:
        raise DstackError("core.sync.node_ttl", "must be at least twice core.sync.interval (a node renews its lease "
                                                "every interval; one late renewal must not mark it down)")
    if sync["timeout"] <= 0:
        raise DstackError("core.sync.timeout", "must be more than 0")
    if bool(sync["etcd_cert"]) != bool(sync["etcd_key"]):
        raise DstackError("core.sync.etcd_key" if sync["etcd_cert"] else "core.sync.etcd_cert",
                          "core.sync.etcd_cert and core.sync.etcd_key go together")
    for name in ("etcd_ca_cert", "etcd_cert", "etcd_key"):
        if sync[name] and not os.path.isfile(sync[name]):
            raise DstackError(f"core.sync.{name}", f"{sync[name]} is not a file")


def _first_hosts(network):
    for host in network.hosts():
        yield host
        return


def redacted(config):
    """The configuration without its secrets (for logs and Admin.Status)."""
    out = {}
    for key, _entry in _leaves(SCHEMA):
        value = config
        for name in key.split("."):
            value = value[name]
        _set(out, key, "<hidden>" if key in SECRET_KEYS and value else value)
    return out

# Copyright: dstack.tee contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""KMS configuration: a TOML file (kms.toml), then DSTACK_KMS_* environment variables, then flags.

Keys (all optional but state_dir):
    state_dir, mode ("production" | "simulation"), listen ("HOST:PORT"), domain,
    sim_state_dir, root_ca, collateral, pccs_url, collateral_cache_dir, audit_log,
    nonce_ttl, gateway_app_id, workers, access_log (true | false: gunicorn's line per request on
    stdout; default true), server_names (more DNS names or IP addresses for the RPC certificate:
    the address a libvirt VM reaches the host's loopback at, 10.0.2.2, say),
    [policy] allowed_tcb_statuses, allowed_advisory_ids, os_image_measurements
             ({os_image_hash = {mrtd, rtmr0, rtmr1, rtmr2}}), require_os_image_measurements
             (default: true in production)
    [auth]   type ("local" | "webhook" | "ethereum"), path, url, timeout, rpc_url, contract_address, chain_id
Environment: DSTACK_KMS_<KEY> for the top-level keys (DSTACK_KMS_MODE=simulation, ...) and
DSTACK_KMS_AUTH_<KEY> for [auth].
"""

import os

from ansible_collections.dstack.tee.plugins.module_utils.host_names import is_server_name
from ansible_collections.dstack.tee.plugins.module_utils.errors import DstackError
from ansible_collections.dstack.tee.plugins.module_utils.fileio import read_toml

TOP_KEYS = ("state_dir", "mode", "listen", "domain", "sim_state_dir", "root_ca", "collateral", "pccs_url",
            "collateral_cache_dir", "audit_log", "nonce_ttl", "gateway_app_id", "workers", "access_log",
            "server_names")
AUTH_KEYS = ("type", "path", "url", "timeout", "rpc_url", "contract_address", "chain_id")


def load_config(path=None, environ=None, **overrides):
    config = read_toml(path) if path else {}
    environ = os.environ if environ is None else environ
    for key in TOP_KEYS:
        if f"DSTACK_KMS_{key.upper()}" in environ:
            config[key] = environ[f"DSTACK_KMS_{key.upper()}"]
    auth = dict(config.get("auth") or {})
    for key in AUTH_KEYS:
        if f"DSTACK_KMS_AUTH_{key.upper()}" in environ:
            auth[key] = environ[f"DSTACK_KMS_AUTH_{key.upper()}"]
    config.update({k: v for k, v in overrides.items() if v is not None})
    if not config.get("state_dir"):
        raise DstackError("state_dir", "is required (--state-dir, state_dir in the config, or DSTACK_KMS_STATE_DIR)")
    state = config["state_dir"] = os.path.abspath(config["state_dir"])
    auth.setdefault("type", "local")
    if auth["type"] == "local":
        auth.setdefault("path", os.path.join(state, "auth-config.json"))
    config["auth"] = auth
    config["access_log"] = _flag(config.get("access_log", True), "access_log")
    config["server_names"] = _server_names(config.get("server_names", []))
    if config.get("mode", "production") == "simulation" and not config.get("root_ca"):
        config.setdefault("sim_state_dir", os.path.join(state, "tdx-sim"))
    return config


def _server_names(value):
    """More names for the RPC certificate (DNS names or IP addresses): a TOML list, or its
    comma-separated text from the environment (DSTACK_KMS_SERVER_NAMES)."""
    names = [part.strip() for part in value.split(",") if part.strip()] if isinstance(value, str) else value
    if not isinstance(names, list):
        raise DstackError("server_names", "must be a list of DNS names or IP addresses")
    for pos, name in enumerate(names):
        if not is_server_name(name):
            raise DstackError(f"server_names[{pos}]", f"{str(name)[:80]!r} is not a DNS name or an IP address")
    return names


def _flag(value, field):
    """A yes/no key: a TOML boolean, or its text from the environment (true/false, 1/0, yes/no, on/off)."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "1", "yes", "on"):
        return True
    if text in ("false", "0", "no", "off"):
        return False
    raise DstackError(field, f"must be true or false, not {str(value)[:20]!r}")

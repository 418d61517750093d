# Copyright: dstack.tee contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""`dstack-kms`: the KMS command.

  dstack-kms init        --state-dir DIR                 make the root keys (once), print the meta
  dstack-kms meta        --state-dir DIR                 GetMeta's key fields as JSON
  dstack-kms env-pubkey  --state-dir DIR --app-id HEX    GetAppEnvEncryptPubKey as JSON
  dstack-kms decrypt-env --state-dir DIR --app-id HEX --in FILE --out-dir DIR [--allowed-envs A,B]
                         [--expect-env-file FILE]
                         what the guest does with .encrypted-env, for simulation and tests only:
                         it needs the root key, which only the KMS holds

  dstack-kms onboard     --state-dir DIR --source-url URL [--source-ca FILE] [--guest-socket PATH]
                         a KMS replica takes the root keys of a running KMS (KMS.GetKmsKey): it
                         proves its boot with a quote from its guest agent (default
                         /var/run/dstack.sock), and the source releases only if its auth backend
                         allows this KMS (kms.mrAggregated / bootAuth/kms / DstackKms.isKmsAllowed);
                         existing root keys are never replaced
  dstack-kms restore     --state-dir DIR --backup DIR
                         put the root keys of a backup back (checked against the backup's
                         root-keys.manifest.json, any manifest left in DIR and DIR's rpc
                         certificate), 0600, with a new manifest; existing keys are never replaced
  dstack-kms attestation-info [--guest-socket PATH]
                         what the source KMS's allowlist must name for this replica: its
                         mr_aggregated, device_id and os_image_hash (as dstack's GetAttestationInfo)

  dstack-kms serve       --state-dir DIR --listen HOST:PORT [--simulated] [--config kms.toml]
                         [--sim-state DIR] [--auth-config FILE] [--workers N] [--no-access-log]
                         the KMS over HTTPS (gunicorn); makes the root keys on the first start in
                         an empty DIR and writes DIR/root-ca.crt, which clients pin; refuses to
                         start when a key file is missing, changed or readable by others, or when
                         DIR lost its keys (restore them from a backup)
"""

import argparse
import json
import os
import sys

from ansible_collections.dstack.tee.agents.cli_support import run_cli
from ansible_collections.dstack.tee.agents.wsgi import run_gunicorn
from ansible_collections.dstack.tee.plugins.module_utils import env_crypt, guest_client, kdf, root_keys
from ansible_collections.dstack.tee.plugins.module_utils.errors import DstackError
from ansible_collections.dstack.tee.plugins.module_utils.fileio import atomic_write, read_bytes, read_text


def _meta(keys):
    return {
        "ca_cert": keys.ca_cert.public_bytes(root_keys.serialization.Encoding.PEM).decode(),
        "k256_pubkey": keys.k256_pubkey.hex(),
    }


def cmd_init(args):
    keys, created = root_keys.load_or_create(args.state_dir)
    print(f"dstack-kms: {'made new' if created else 'kept the existing'} root keys in {args.state_dir}",
          file=sys.stderr)
    return dict(_meta(keys), created=created, state_dir=os.path.abspath(args.state_dir))


def cmd_meta(args):
    return _meta(root_keys.load(args.state_dir))


def cmd_env_pubkey(args):
    return root_keys.load(args.state_dir).env_pubkey_response(args.app_id)


def cmd_decrypt_env(args):
    keys = root_keys.load(args.state_dir)
    blob = read_bytes(args.input, "--in")
    items = env_crypt.decrypt_env(blob, kdf.env_crypt_key(keys.ca_key, args.app_id), ".encrypted-env")
    allowed = [a for a in (args.allowed_envs or "").split(",") if a]
    kept, dropped = env_crypt.filter_allowed(items, allowed) if args.allowed_envs is not None else (items, [])
    for name in dropped:
        print(f"dstack-kms: dropped {name}: not in allowed_envs", file=sys.stderr)
    os.makedirs(args.out_dir, mode=0o700, exist_ok=True)
    atomic_write(os.path.join(args.out_dir, ".decrypted-env"), env_crypt.render_dotenv(kept), mode=0o600)
    atomic_write(os.path.join(args.out_dir, ".decrypted-env.json"), env_crypt.render_json(kept), mode=0o600)
    result = {"env_keys": [key for key, _value in kept], "dropped_envs": dropped,
              "out_dir": os.path.abspath(args.out_dir)}
    if args.expect_env_file:
        # Compare with the clear source, naming variables only, never values.
        expected_text = read_text(args.expect_env_file, "--expect-env-file")
        expected = dict(env_crypt.parse_dotenv(expected_text, "--expect-env-file"))
        result["round_trip"] = {
            "equal": sorted(k for k, v in kept if expected.get(k) == v),
            "different": sorted(k for k, v in kept if k in expected and expected[k] != v),
            "missing": sorted(k for k in expected if k not in dict(kept) and k not in dropped),
        }
    return result


def cmd_attestation_info(args):
    info = guest_client.info(args.guest_socket, field="--guest-socket")
    names = ("mr_aggregated", "device_id", "os_image_hash", "app_id", "compose_hash", "instance_id")
    return {name: info.get(name, "") for name in names}


def cmd_onboard(args):
    """Take the root keys of a running KMS, attested; never replace keys this state directory has."""
    from ansible_collections.dstack.tee.plugins.module_utils.kms_client import KmsClient  # pylint: disable=import-outside-toplevel

    def result(keys, changed):
        return {"changed": changed, "k256_pubkey": keys.k256_pubkey.hex(), "state_dir": os.path.abspath(args.state_dir),
                "source_url": args.source_url}

    client = KmsClient(args.source_url, ca_cert=args.source_ca, field="--source-url")
    meta = client.get_meta()
    if root_keys.holds_keys(args.state_dir):
        # Asked before any attestation: a replica that already has these keys has nothing to fetch.
        keys = root_keys.load(args.state_dir)
        if keys.k256_pubkey.hex() != meta.get("k256_pubkey"):
            raise root_keys.other_keys_error(args.state_dir, "--state-dir")
        print(f"dstack-kms: {args.state_dir} already holds the root keys of {args.source_url}", file=sys.stderr)
        return result(keys, False)
    print(f"dstack-kms: asking {args.source_url} for its root keys, attested by the quote of {args.guest_socket}",
          file=sys.stderr)
    received = client.get_kms_key(lambda report_data: guest_client.get_quote(args.guest_socket, report_data,
                                                                             field="--guest-socket"))
    try:
        ca_key, ca_cert, k256 = (received["ca_key"].encode(), received["ca_cert"].encode(),
                                 bytes.fromhex(received["k256_key"]))
    except (KeyError, AttributeError, ValueError):
        raise DstackError("--source-url", "GetKmsKey answered without {ca_key, ca_cert, k256_key}") from None
    candidate = root_keys.parse(ca_key, ca_cert, k256, where="received ")
    if candidate.k256_pubkey.hex() != meta.get("k256_pubkey") or ca_cert.decode().strip() != str(meta.get("ca_cert")).strip():
        raise DstackError("--source-url", "the keys GetKmsKey released are not the ones the source's GetMeta shows")
    keys, changed = root_keys.install(args.state_dir, ca_key, ca_cert, k256)
    print(f"dstack-kms: onboarded: root keys stored in {args.state_dir} (0600, with {root_keys.MANIFEST})",
          file=sys.stderr)
    return result(keys, changed)


def cmd_restore(args):
    """Put the root keys of a backup back into the state directory (never over other keys)."""
    keys, changed = root_keys.restore(args.state_dir, args.backup)
    if changed:
        print(f"dstack-kms: restored the root keys of {args.backup} into {args.state_dir} (0600, with "
              f"{root_keys.MANIFEST})", file=sys.stderr)
    else:
        print(f"dstack-kms: {args.state_dir} already holds the root keys of {args.backup}", file=sys.stderr)
    return {"changed": changed, "k256_pubkey": keys.k256_pubkey.hex(), "state_dir": os.path.abspath(args.state_dir),
            "backup": os.path.abspath(args.backup)}


def cmd_serve(args):
    """Run the KMS under gunicorn over HTTPS until stopped."""
    import logging  # pylint: disable=import-outside-toplevel
    from ansible_collections.dstack.tee.agents.kms import config as kms_config, tls  # pylint: disable=import-outside-toplevel
    from ansible_collections.dstack.tee.agents.kms.app import create_app  # pylint: disable=import-outside-toplevel

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    auth = {"type": "local", "path": args.auth_config} if args.auth_config else None
    config = kms_config.load_config(args.config, state_dir=args.state_dir, listen=args.listen,
                                    mode="simulation" if args.simulated else None,
                                    sim_state_dir=args.sim_state, workers=args.workers,
                                    access_log=False if args.no_access_log else None)
    if auth:
        config["auth"] = auth
    host, _sep, port = (config.get("listen") or "127.0.0.1:8000").rpartition(":")
    if not host or not port.isdigit():
        raise DstackError("--listen", "must be HOST:PORT")
    keys, created = root_keys.load_or_create(config["state_dir"], also_history=[config.get("audit_log")])
    print(f"dstack-kms: {'made new' if created else 'loaded'} root keys in {config['state_dir']} "
          f"(root CA certificate: {os.path.join(config['state_dir'], root_keys.ROOT_CA_CERT)})", file=sys.stderr)
    if config["auth"].get("type") == "local" and not os.path.exists(config["auth"]["path"]):
        atomic_write(config["auth"]["path"], json.dumps(EMPTY_ALLOWLIST, indent=2).encode() + b"\n", mode=0o644)
        print(f"dstack-kms: made an empty allowlist {config['auth']['path']} (it allows nothing yet)", file=sys.stderr)
    names = ["localhost", "127.0.0.1", "::1", host.strip("[]"), config.get("domain"), *config["server_names"]]
    cert, key = tls.ensure_rpc_cert(config["state_dir"], keys, names)
    app = create_app(config)  # fails here, before listening, on a bad configuration
    print(f"dstack-kms: {config.get('mode', 'production')} mode, serving https://{host}:{port}/prpc/KMS.*",
          file=sys.stderr)
    # The access log: a line per request on stdout (wsgi.AccessLine: gunicorn's own cost ~0.3 ms per
    # request on this worker); access_log = false drops it (every release and refusal stays in the
    # audit log, refusals in the error log too).
    # gunicorn's asyncio worker: a threaded worker's handoffs between its threads cost more CPU per
    # request than the HTTP itself. With the local allowlist a release waits on nothing but the
    # local disk, so it is answered on the event loop; a chain or webhook backend gets threads.
    run_gunicorn(app, bind=f"{host}:{port}", certfile=cert, keyfile=key, workers=int(config.get("workers") or 2),
                 asgi={"inline": not app.extensions["dstack_kms"].auth.asks_the_network, "threads": 4},
                 timeout=60, accesslog="-" if config["access_log"] else None, errorlog="-", loglevel="info")
    return None


EMPTY_ALLOWLIST = {"gatewayAppId": "", "osImages": [], "kms": {"mrAggregated": [], "devices": [],
                                                               "allowAnyDevice": False}, "apps": {}}


def build_parser():
    parser = argparse.ArgumentParser(prog="dstack-kms", description="The dstack.tee key management service.")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="serve the KMS over HTTPS")
    serve.add_argument("--state-dir", help="the KMS state directory (root keys, nonces, audit log)")
    serve.add_argument("--listen", help="HOST:PORT to listen on (default 127.0.0.1:8000)")
    serve.add_argument("--simulated", action="store_true", help="simulation mode: trust the simulated TDX root")
    serve.add_argument("--config", help="a kms.toml")
    serve.add_argument("--sim-state", help="the simulator state directory (default STATE_DIR/tdx-sim)")
    serve.add_argument("--auth-config", help="the local allowlist (default STATE_DIR/auth-config.json)")
    serve.add_argument("--workers", type=int, help="gunicorn worker processes (default 2)")
    serve.add_argument("--no-access-log", action="store_true",
                       help="no access line per request on stdout (access_log = false in kms.toml)")
    serve.set_defaults(func=cmd_serve)
    onboard = sub.add_parser("onboard", help="take the root keys of a running KMS (attested onboarding)")
    onboard.add_argument("--state-dir", required=True, help="this replica's state directory (gets the root keys)")
    onboard.add_argument("--source-url", required=True, help="the running KMS, https://HOST:PORT")
    onboard.add_argument("--source-ca", help="the source KMS's root-ca.crt to check its HTTPS against")
    onboard.add_argument("--guest-socket", default=guest_client.DEFAULT_SOCKET,
                         help=f"this CVM's guest agent socket, for the quote (default {guest_client.DEFAULT_SOCKET})")
    onboard.set_defaults(func=cmd_onboard)
    restore = sub.add_parser("restore", help="put the root keys of a backup back into the state directory")
    restore.add_argument("--state-dir", required=True, help="the KMS state directory (the KMS stopped)")
    restore.add_argument("--backup", required=True,
                         help="a copy of root-ca.key, root-ca.crt, root-k256.key and root-keys.manifest.json")
    restore.set_defaults(func=cmd_restore)
    info = sub.add_parser("attestation-info", help="print what a source KMS's allowlist must name for this replica")
    info.add_argument("--guest-socket", default=guest_client.DEFAULT_SOCKET,
                      help=f"this CVM's guest agent socket (default {guest_client.DEFAULT_SOCKET})")
    info.set_defaults(func=cmd_attestation_info)
    for name, func, help_text in (
            ("init", cmd_init, "make the root keys if the state directory has none; print the meta"),
            ("meta", cmd_meta, "print the CA certificate and k256 public key"),
            ("env-pubkey", cmd_env_pubkey, "print an app's signed env-encryption public key"),
            ("decrypt-env", cmd_decrypt_env, "decrypt an .encrypted-env as the guest would (testing only)")):
        cmd = sub.add_parser(name, help=help_text)
        cmd.add_argument("--state-dir", required=True, help="the KMS state directory (root keys, 0600)")
        cmd.set_defaults(func=func)
        if name in ("env-pubkey", "decrypt-env"):
            cmd.add_argument("--app-id", required=True, help="the app id, 20 bytes hex")
        if name == "decrypt-env":
            cmd.add_argument("--in", dest="input", required=True, help="the .encrypted-env file")
            cmd.add_argument("--out-dir", required=True, help="where .decrypted-env(.json) go (0600)")
            cmd.add_argument("--allowed-envs", help="comma-separated names to keep; others are dropped")
            cmd.add_argument("--expect-env-file", help="a clear .env to compare with (reports names only)")
    return parser


def main(argv=None):
    return run_cli("dstack-kms", build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())

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

The network service (`dstack-kms serve`) comes with the KMS issue.
"""

import argparse
import json
import os
import sys

from ansible_collections.dstack.tee.agents.kms import root_keys
from ansible_collections.dstack.tee.plugins.module_utils import env_crypt, kdf
from ansible_collections.dstack.tee.plugins.module_utils.errors import DstackError
from ansible_collections.dstack.tee.plugins.module_utils.fileio import atomic_write


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
    try:
        with open(args.input, "rb") as handle:
            blob = handle.read()
    except OSError as exc:
        raise DstackError("--in", f"cannot read {args.input}: {exc.strerror}") from None
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
        try:
            with open(args.expect_env_file, encoding="utf-8") as handle:
                expected = dict(env_crypt.parse_dotenv(handle.read(), "--expect-env-file"))
        except OSError as exc:
            raise DstackError("--expect-env-file", f"cannot read {args.expect_env_file}: {exc.strerror}") from None
        result["round_trip"] = {
            "equal": sorted(k for k, v in kept if expected.get(k) == v),
            "different": sorted(k for k, v in kept if k in expected and expected[k] != v),
            "missing": sorted(k for k in expected if k not in dict(kept) and k not in dropped),
        }
    return result


def build_parser():
    parser = argparse.ArgumentParser(prog="dstack-kms", description="The dstack.tee key management service.")
    sub = parser.add_subparsers(dest="command", required=True)
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
    args = build_parser().parse_args(argv)
    try:
        result = args.func(args)
    except DstackError as exc:
        print(f"dstack-kms: error: {exc}", file=sys.stderr)
        return 2
    json.dump(result, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: dstack.tee contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)

DOCUMENTATION = r"""
---
module: env_encrypt
short_description: Encrypt an app's secrets on the controller to its KMS env key (dstack encrypted env)
version_added: 0.1.0
description:
  - Encrypts env variables to an app's X25519 env-encryption public key in dstack's format
    (C(eph_pub | iv | ciphertext+tag), AES-256-GCM), so that only a CVM the KMS released the
    app's keys to can read them. Secrets never leave the controller in clear.
  - Before encrypting, checks that the public key was signed by the trusted KMS
    (O(kms_k256_pubkey)) for this O(app_id), preferring the timestamped O(signature_v1), which is
    refused when older than 300 seconds. A missing, bad or stale signature fails the task unless
    O(verify_signature=false) is set, which warns.
  - Variables not in O(allowed_envs) (when given) are not encrypted at all, and are reported by
    name in RV(dropped_envs) (not as a warning - leaving them out is what the option asks for).
  - Encryption is randomised, so to stay idempotent the module keeps beside O(dest) a file
    C(<dest>.fingerprint) holding the variable names and an HMAC of the public key and
    plaintext, keyed by a per-user secret (O(fingerprint_key_file)). The same input then
    reports no change. No value can be recovered from it.
author:
  - dstack.tee contributors (@dstack-tee)
attributes:
  check_mode:
    support: full
  diff_mode:
    support: full
    details: The diff shows variable names and whether values changed, never a value.
  idempotent:
    support: full
    details: Idempotent through the fingerprint file described above.
options:
  env:
    description: The variables, a mapping of names to values. Exactly one of O(env) and O(env_file).
    type: dict
  env_file:
    description: A C(.env) file (C(KEY=value) lines, C(export), quotes and comments allowed).
    type: path
  public_key:
    description:
      - The app's env-encryption public key (X25519, 32 bytes, hex), as GetAppEnvEncryptPubKey returns it.
      - Exactly one of O(public_key) and O(kms_url).
    type: str
  kms_url:
    description:
      - Fetch the public key and its signatures from this KMS (GetAppEnvEncryptPubKey for O(app_id)).
      - The signature is still checked against O(kms_k256_pubkey), which must come from your own
        records, not from the same KMS answer.
    type: str
  kms_ca_cert:
    description: The KMS root CA certificate (its C(root-ca.crt)) that the KMS's HTTPS certificate must chain to.
    type: path
  signature_v1:
    description: The KMS signature over the public key with O(timestamp) (65 bytes, hex).
    type: str
  timestamp:
    description: The Unix time the KMS signed O(signature_v1) at.
    type: int
  signature:
    description: The legacy KMS signature (no timestamp, so no replay protection); used only without O(signature_v1).
    type: str
  app_id:
    description: The app id the key belongs to (20 bytes, hex). Required to verify the signature.
    type: str
  kms_k256_pubkey:
    description: The trusted KMS k256 public key (SEC1 compressed, hex), the one signer accepted.
    type: str
  verify_signature:
    description: Whether to verify the KMS signature. Setting V(false) encrypts to an unverified key and warns.
    type: bool
    default: true
  allowed_envs:
    description: When given, only these variables are encrypted; the others are reported in RV(dropped_envs).
    type: list
    elements: str
  dest:
    description:
      - Where to write the encrypted env (raw bytes, the C(.encrypted-env) of the config share).
        Its folder must exist. When unset, the encryption is only returned.
    type: path
  fingerprint_key_file:
    description: The per-user secret that keys the fingerprint file; made (mode 0600) when missing.
    type: path
    default: ~/.ansible/dstack/env-fingerprint.key
extends_documentation_fragment:
  - dstack.tee.attributes
  - ansible.builtin.files
seealso:
  - module: dstack.tee.app_compose
"""

EXAMPLES = r"""
- name: Encrypt the app's secrets to its KMS-signed env key
  dstack.tee.env_encrypt:
    env_file: secrets.env
    allowed_envs: "{{ app.app_compose.allowed_envs }}"
    public_key: "{{ pubkey.public_key }}"
    signature_v1: "{{ pubkey.signature_v1 }}"
    timestamp: "{{ pubkey.timestamp }}"
    app_id: "{{ app.app_id }}"
    kms_k256_pubkey: "{{ kms_meta.k256_pubkey }}"
    dest: build/hello/encrypted-env

- name: Fetch the key from the KMS and encrypt
  dstack.tee.env_encrypt:
    env_file: secrets.env
    kms_url: https://kms.example.com:8000
    kms_ca_cert: files/kms-root-ca.crt
    app_id: "{{ app.app_id }}"
    kms_k256_pubkey: "{{ kms_k256_pubkey }}"
    dest: build/hello/encrypted-env

- name: Encrypt values from the vault
  dstack.tee.env_encrypt:
    env:
      API_TOKEN: "{{ vault_api_token }}"
    public_key: "{{ pubkey.public_key }}"
    signature_v1: "{{ pubkey.signature_v1 }}"
    timestamp: "{{ pubkey.timestamp }}"
    app_id: "{{ app.app_id }}"
    kms_k256_pubkey: "{{ kms_meta.k256_pubkey }}"
  register: sealed
"""

RETURN = r"""
encrypted_env:
  description: The encrypted env (hex), as written to O(dest).
  returned: always
  type: str
env_keys:
  description: The names of the variables encrypted.
  returned: always
  type: list
  elements: str
  sample: [GREETING, API_TOKEN]
dropped_envs:
  description: The names of the variables left out because they are not in O(allowed_envs).
  returned: always
  type: list
  elements: str
signature:
  description: Which signature was verified, V(v1) or V(legacy), or V(not verified).
  returned: always
  type: str
dest:
  description: The path written (or that would be written).
  returned: when O(dest) is set
  type: str
"""

import hashlib
import hmac
import json
import os

from ansible.module_utils.basic import AnsibleModule, missing_required_lib
from ansible_collections.dstack.tee.plugins.module_utils import env_crypt, kdf
from ansible_collections.dstack.tee.plugins.module_utils.errors import DstackError, parse_hex
from ansible_collections.dstack.tee.plugins.module_utils.kms_client import KmsClient
from ansible_collections.dstack.tee.plugins.module_utils.module_support import (
    apply_file_attributes, read_bytes, read_text, write_file)


def _fingerprint_key(module, path, create):
    """The per-user fingerprint secret, made when missing (not in check mode)."""
    key = read_bytes(path)
    if key is not None or not create:
        return key
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    key = os.urandom(32)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # made meanwhile by a parallel task
        return read_bytes(path)
    with os.fdopen(fd, "wb") as handle:
        handle.write(key)
    return key


def _record(key, public_key, plaintext, names):
    mac = hmac.new(key, public_key + plaintext, hashlib.sha256).hexdigest() if key else None
    return {"env_keys": names, "public_key": public_key.hex(), "fingerprint": mac}


def _diff_view(record):
    if not record:
        return ""
    return json.dumps({"env_keys": record.get("env_keys"), "public_key": record.get("public_key"),
                       "values": "fingerprint " + str(record.get("fingerprint"))[:12]}, indent=2) + "\n"


def main():
    module = AnsibleModule(
        argument_spec=dict(
            env=dict(type="dict", no_log=True),
            env_file=dict(type="path"),
            public_key=dict(type="str", no_log=False),
            kms_url=dict(type="str"),
            kms_ca_cert=dict(type="path"),
            signature_v1=dict(type="str"),
            timestamp=dict(type="int"),
            signature=dict(type="str"),
            app_id=dict(type="str"),
            kms_k256_pubkey=dict(type="str", no_log=False),
            verify_signature=dict(type="bool", default=True),
            allowed_envs=dict(type="list", elements="str"),
            dest=dict(type="path"),
            fingerprint_key_file=dict(type="path", default="~/.ansible/dstack/env-fingerprint.key",
                                      no_log=False),
        ),
        mutually_exclusive=[("env", "env_file"), ("public_key", "kms_url")],
        required_one_of=[("env", "env_file"), ("public_key", "kms_url")],
        required_if=[("verify_signature", True, ("app_id", "kms_k256_pubkey"))],
        required_by={"kms_url": "app_id"},
        supports_check_mode=True,
        add_file_common_args=True,
    )
    if not (env_crypt.HAS_CRYPTOGRAPHY and kdf.HAS_CRYPTOGRAPHY):
        module.fail_json(msg=missing_required_lib("cryptography"))
    if module.params["verify_signature"] and not kdf.HAS_SECP256K1:
        module.fail_json(msg=missing_required_lib("coincurve"))
    params = module.params

    try:
        if params["env_file"]:
            items = env_crypt.parse_dotenv(read_text(module, params["env_file"], "env_file"), "env_file")
        else:
            items = env_crypt.env_items(params["env"], "env")
        if params["kms_url"]:
            answer = KmsClient(params["kms_url"], params["kms_ca_cert"]).get_app_env_encrypt_pubkey(params["app_id"])
            params.update(public_key=answer.get("public_key", ""), signature_v1=answer.get("signature_v1"),
                          timestamp=answer.get("timestamp"), signature=answer.get("signature"))
        public_key = parse_hex(params["public_key"], "public_key", length=32)
        if params["verify_signature"]:
            signature = kdf.verify_env_pubkey(
                public_key, params["app_id"], params["kms_k256_pubkey"],
                signature_v1=params["signature_v1"], timestamp=params["timestamp"],
                signature=params["signature"])
            if signature == "legacy":
                module.warn("public_key: verified with the legacy signature, which has no timestamp "
                            "and so no replay protection; prefer signature_v1")
        else:
            signature = "not verified"
            module.warn("verify_signature is false: encrypting to a public key no KMS signature vouches for")
        dropped = []
        if params["allowed_envs"] is not None:
            # Leaving out what allowed_envs does not name is what the option asks for, not a
            # warning: the names are in the result (dropped_envs), as dstack's guest logs them.
            items, dropped = env_crypt.filter_allowed(items, params["allowed_envs"])
    except DstackError as exc:
        module.fail_json(msg=str(exc), field=exc.field)

    names = [key for key, _value in items]
    plaintext = env_crypt.env_plaintext(items)
    result = dict(changed=False, env_keys=names, dropped_envs=dropped, signature=signature)
    dest = params["dest"]
    if not dest:
        result["encrypted_env"] = env_crypt.encrypt_env(items, public_key).hex()
        module.exit_json(**result)

    sidecar = dest + ".fingerprint"
    try:
        before = json.loads(read_bytes(sidecar) or b"null")
    except ValueError:
        before = None
    current = read_bytes(dest)
    key = _fingerprint_key(module, params["fingerprint_key_file"], create=not module.check_mode)
    after = _record(key, public_key, plaintext, names)
    unchanged = current is not None and after["fingerprint"] and before == after
    if unchanged:
        blob = current
        changed = False
    else:
        blob = env_crypt.encrypt_env(items, public_key)
        changed = write_file(module, dest, blob)
        if not module.check_mode:
            write_file(module, sidecar, json.dumps(after, sort_keys=True).encode() + b"\n", "dest")
    result.update(changed=apply_file_attributes(module, dest, changed), dest=dest,
                  encrypted_env=blob.hex())
    if changed and module._diff:
        result["diff"] = dict(before_header=dest, after_header=dest,
                              before=_diff_view(before), after=_diff_view(after))
    module.exit_json(**result)


if __name__ == "__main__":
    main()

#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: dstack.tee contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)

DOCUMENTATION = r"""
---
module: acme_lab_config
short_description: Write the configuration of a local ACME CA (Pebble) and DNS server (BIND9) for DNS-01
version_added: 0.1.0
description:
  - The files of the simulated default's ACME world (the role dstack.tee.acme_lab runs them) -
    BIND9's C(named.conf), a zone for O(zone) open to RFC 2136 updates signed with a TSIG key,
    Pebble's C(pebble.json) and the certificate of its HTTPS listener, and certbot-dns-rfc2136's
    credentials for that key (what the gateway's C([core.certbot]) reads).
  - "Under O(path): C(bind/named.conf), C(bind/tsig.key) (0600, the TSIG secret, made once),
    C(bind/<zone>.zone) (written only when missing: named keeps the records it is sent in it and
    its journal), C(pebble/pebble.json), C(pebble/listener-ca.pem), C(pebble/listener.pem) and
    C(pebble/listener.key) (0600; made once, again only when unreadable, not for the listen
    addresses or within 30 days of expiry), and O(credentials_file) (0600)."
  - The texts come from the collection's one home for them (module_utils/acme_lab.py), which the
    tests' BIND9 and Pebble use too. The TSIG secret is never returned nor shown.
author:
  - dstack.tee contributors (@dstack-tee)
attributes:
  check_mode:
    support: full
  diff_mode:
    support: full
    details: The diff shows named.conf, the zone file and pebble.json; keys, certificates and the credentials are named only.
  idempotent:
    support: full
options:
  path:
    description: The folder of the files (made 0700 when missing).
    type: path
    required: true
  zone:
    description: The zone BIND9 is authoritative for (the gateway's base domain).
    type: str
    required: true
  records:
    description: The zone's records besides its SOA and NS, in the master file format (used only when the zone file is made).
    type: list
    elements: str
    default: ["@ IN A 127.0.0.1", "* IN A 127.0.0.1"]
  dns_listen:
    description: IP:PORT BIND9 answers on (UDP and TCP).
    type: str
    default: 127.0.0.1:8053
  tsig_name:
    description: The TSIG key's name (C(dns_rfc2136_name)).
    type: str
    default: dstack-acme
  pebble_listen:
    description: IP:PORT of Pebble's ACME API (its directory at C(https://IP:PORT/dir)).
    type: str
    default: 127.0.0.1:14000
  pebble_management_listen:
    description: IP:PORT of Pebble's management API (C(/roots/0), the root it issues under).
    type: str
    default: 127.0.0.1:15000
  credentials_file:
    description: Where certbot-dns-rfc2136's credentials for the TSIG key go (0600); default C(<path>/dns-credentials.ini).
    type: path
extends_documentation_fragment:
  - dstack.tee.attributes
"""

EXAMPLES = r"""
- name: Write BIND9's and Pebble's configuration for dstack.localhost
  dstack.tee.acme_lab_config:
    path: /var/lib/dstack/acme-lab
    zone: dstack.localhost
  register: lab

- name: Run BIND9
  dstack.tee.supervisor_program:
    name: dstack-bind9
    command: [/usr/sbin/named, -g, -c, "{{ lab.files.named_conf }}"]
    supervisor_dir: /var/lib/dstack/services
    state: "{{ 'restarted' if lab.named_changed else 'started' }}"
"""

RETURN = r"""
files:
  description: The paths of the files (named_conf, tsig_key, zone_file, pebble_config, ca_bundle (the listener's CA), listener_cert, listener_key, credentials).
  returned: always
  type: dict
named_changed:
  description: Whether a file named reads changed (named.conf, the TSIG key, the zone file), so that it must be restarted.
  returned: always
  type: bool
pebble_changed:
  description: Whether a file Pebble reads changed (pebble.json, its listener's certificate), so that it must be restarted.
  returned: always
  type: bool
changed_files:
  description: The files written (or that would be, in check mode).
  returned: always
  type: list
  elements: str
dns_server:
  description: IP:PORT of BIND9 (Pebble's C(-dnsserver)).
  returned: always
  type: str
directory_url:
  description: Pebble's ACME directory URL.
  returned: always
  type: str
pebble_environment:
  description: The environment Pebble runs with (no random validation waits or nonce rejections, every order validated).
  returned: always
  type: dict
"""

import ipaddress
import os
import traceback

from ansible.module_utils.basic import AnsibleModule, missing_required_lib
from ansible_collections.dstack.tee.plugins.module_utils import acme_lab, fileio
from ansible_collections.dstack.tee.plugins.module_utils.errors import DstackError


def _listen(value, field):
    host, _sep, port = (value or "").rpartition(":")
    try:
        ipaddress.ip_address(host)
        number = int(port)
    except ValueError:
        raise DstackError(field, f"must be IP:PORT, got {value!r}") from None
    if not 0 < number < 65536:
        raise DstackError(field, f"port {number} is not between 1 and 65535")
    return host, number


def _text(path, field):
    return fileio.read_text(path, field, missing_ok=True)


class Plan:
    """The files to write: path -> (text, mode, secret); `named` and `pebble` say whose they are."""

    def __init__(self):
        self.files, self.owner = {}, {}

    def add(self, path, text, mode, owner, secret=False):
        self.files[path] = (text, mode, secret)
        self.owner[path] = owner


def _plan(params):
    folder = os.path.abspath(params["path"])
    bind, pebble = os.path.join(folder, "bind"), os.path.join(folder, "pebble")
    dns_ip, dns_port = _listen(params["dns_listen"], "dns_listen")
    pebble_ip, pebble_port = _listen(params["pebble_listen"], "pebble_listen")
    management_ip, _port = _listen(params["pebble_management_listen"], "pebble_management_listen")
    zone = acme_lab.check_name(params["zone"], "zone")
    key_name = acme_lab.check_name(params["tsig_name"], "tsig_name")
    paths = {"named_conf": os.path.join(bind, "named.conf"), "tsig_key": os.path.join(bind, "tsig.key"),
             "zone_file": os.path.join(bind, f"{zone}.zone"), "pebble_config": os.path.join(pebble, "pebble.json"),
             "ca_bundle": os.path.join(pebble, "listener-ca.pem"), "listener_cert": os.path.join(pebble, "listener.pem"),
             "listener_key": os.path.join(pebble, "listener.key"),
             "credentials": os.path.abspath(params["credentials_file"] or os.path.join(folder, "dns-credentials.ini"))}
    plan = Plan()
    # The TSIG secret and the listener's certificate are made once: kept while they serve.
    secret = acme_lab.tsig_secret(_text(paths["tsig_key"], "tsig_key")) or acme_lab.new_tsig_secret()
    plan.add(paths["tsig_key"], acme_lab.tsig_key(key_name, secret), 0o600, "named", secret=True)
    if _text(paths["zone_file"], "zone") is None:
        plan.add(paths["zone_file"], acme_lab.zone_file(zone, params["records"]), 0o644, "named")
    plan.add(paths["named_conf"], acme_lab.named_conf(bind, paths["tsig_key"], key_name, {zone: paths["zone_file"]},
                                                      dns_ip, dns_port), 0o644, "named")
    names = sorted({"localhost", "127.0.0.1", pebble_ip, management_ip})
    have = [_text(paths[name], name) for name in ("ca_bundle", "listener_cert", "listener_key")]
    if None in have or not acme_lab.listener_tls_current(*have, names):
        ca_pem, cert_pem, key_pem = acme_lab.listener_tls(names)
        plan.add(paths["ca_bundle"], ca_pem, 0o644, "pebble")
        plan.add(paths["listener_cert"], cert_pem, 0o644, "pebble")
        plan.add(paths["listener_key"], key_pem, 0o600, "pebble", secret=True)
    plan.add(paths["pebble_config"],
             acme_lab.pebble_config(f"{pebble_ip}:{pebble_port}", params["pebble_management_listen"],
                                    paths["listener_cert"], paths["listener_key"]), 0o644, "pebble")
    plan.add(paths["credentials"], acme_lab.rfc2136_credentials(dns_ip, dns_port, key_name, secret), 0o600, "gateway",
             secret=True)
    return plan, paths, f"{dns_ip}:{dns_port}", f"https://{pebble_ip}:{pebble_port}/dir"


def _mode(path):
    try:
        return os.stat(path).st_mode & 0o7777
    except FileNotFoundError:
        return None


def main():
    module = AnsibleModule(
        argument_spec=dict(
            path=dict(type="path", required=True),
            zone=dict(type="str", required=True),
            records=dict(type="list", elements="str", default=["@ IN A 127.0.0.1", "* IN A 127.0.0.1"]),
            dns_listen=dict(type="str", default="127.0.0.1:8053"),
            tsig_name=dict(type="str", default="dstack-acme"),
            pebble_listen=dict(type="str", default="127.0.0.1:14000"),
            pebble_management_listen=dict(type="str", default="127.0.0.1:15000"),
            credentials_file=dict(type="path"),
        ),
        supports_check_mode=True,
    )
    if not acme_lab.HAS_CRYPTOGRAPHY:
        module.fail_json(msg=missing_required_lib("cryptography"), exception=traceback.format_exc())
    try:
        plan, paths, dns_server, directory_url = _plan(module.params)
        changed, before, after = [], [], []
        for path, (text, mode, secret) in plan.files.items():
            old = _text(path, path)
            if old == text and _mode(path) == mode:
                continue
            changed.append(path)
            # Keys and certificates by name only: a certificate's PEM repeats its key's public part.
            hidden = secret or text.startswith("-----BEGIN")
            before.append(f"{path}: {'absent' if old is None else '<hidden>' if hidden else old}")
            after.append(f"{path}: {'<hidden, changed>' if hidden else text}")
            if not module.check_mode:
                os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
                fileio.atomic_write(path, text.encode(), mode=mode)
                os.chmod(path, mode)
        if not module.check_mode and paths["zone_file"] in changed:
            # A journal of an earlier zone file would not match the new one: named refuses to load both.
            if os.path.exists(paths["zone_file"] + ".jnl"):
                os.unlink(paths["zone_file"] + ".jnl")
    except DstackError as exc:
        module.fail_json(msg=str(exc), field=exc.field)
    except OSError as exc:
        module.fail_json(msg=f"path: cannot write under {module.params['path']}: {exc}", field="path")
    owners = {plan.owner[path] for path in changed}
    module.exit_json(changed=bool(changed), changed_files=changed, files=paths, named_changed="named" in owners,
                     pebble_changed="pebble" in owners, dns_server=dns_server, directory_url=directory_url,
                     pebble_environment=acme_lab.PEBBLE_ENV,
                     diff={"before": "\n".join(before) + ("\n" if before else ""),
                           "after": "\n".join(after) + ("\n" if after else "")})


if __name__ == "__main__":
    main()

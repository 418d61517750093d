# Copyright: dstack.tee contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""`dstack-gateway`: the gateway command.

  dstack-gateway serve --config gateway.toml [--state-dir DIR] [--listen HOST:PORT]
                       [--admin-listen HOST:PORT] [--workers N]
                         the whole gateway (agents/gateway/server.py): the WireGuard hub
                         ([core.wg] interface up with wireguard-go, the store's peers restored),
                         the control and Admin APIs as serve-control, and the data plane
                         ([core.proxy], TLS by SNI to the CVMs); SIGTERM stops it all
  dstack-gateway serve-control --config gateway.toml [--state-dir DIR] [--listen HOST:PORT]
                               [--admin-listen HOST:PORT] [--workers N]
                         the control API (Gateway.RegisterCvm, Info, GetPeers) over mutual TLS
                         under gunicorn: rpc.cert / rpc.key are the gateway's certificate, client
                         certificates are optional at the TLS layer and must chain to
                         rpc.kms_root_ca (RegisterCvm then verifies them fully); with admin.listen,
                         the Admin API on that second listener (bearer admin.token). No WireGuard
                         hub: `serve` runs one.
  dstack-gateway check-config --config gateway.toml
                         load and check the configuration; print it, secrets hidden
  dstack-gateway renew-cert --config gateway.toml [--force] [--name DOMAIN]
                         with [core.certbot]: order the wildcard certificate now if it is due
                         (--force: in any case) through certbot, its key quoted first; prints
                         {renewed, reason}. A running serve serves it within seconds. Another
                         node (or serve) ordering it at the same time: not ordered here.
                         --name: the certificate of a custom domain a registered app declares
                         (custom_certs.py), only while its TXT record names that app
  dstack-gateway set-caa --config gateway.toml
                         with [core.certbot]: pin the domain's CAA records to ca_name, DNS-01 and
                         the gateway's attested ACME account (registered first if there is none),
                         through the DNS provider (left alone when they are exactly those);
                         prints {changed, records}
  dstack-gateway set-txt --config gateway.toml --domain DOMAIN --app-id APP_ID [--port PORT] [--check]
                         the custom domain's record <app_address_ns_prefix>.DOMAIN TXT
                         "APP_ID:PORT" (port 80 by default) through [core.certbot] dns_provider
                         and credentials, left alone when it is already that; --check changes
                         nothing; prints {changed, name, type, value, before}
"""

import argparse
import os
import sys

from ansible_collections.dstack.tee.agents.cli_support import run_cli
from ansible_collections.dstack.tee.agents.gateway import config as gateway_config
from ansible_collections.dstack.tee.plugins.module_utils.app_compose import CUSTOM_DOMAIN_PORT
from ansible_collections.dstack.tee.plugins.module_utils.errors import DstackError


def _overrides(args):
    return {"core.state_dir": getattr(args, "state_dir", None), "rpc.listen": getattr(args, "listen", None),
            "admin.listen": getattr(args, "admin_listen", None), "rpc.workers": getattr(args, "workers", None)}


def _load(args):
    return gateway_config.load_config(args.config, overrides=_overrides(args))


def cmd_check_config(args):
    return gateway_config.redacted(_load(args))


def cmd_serve(args):
    """Serve the whole gateway until stopped (agents/gateway/server.py)."""
    import logging  # pylint: disable=import-outside-toplevel
    from ansible_collections.dstack.tee.agents.gateway import server  # pylint: disable=import-outside-toplevel

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    server.serve(args.config, _overrides(args))


def cmd_serve_control(args):
    """Serve the control (and Admin) API under gunicorn until stopped."""
    import logging  # pylint: disable=import-outside-toplevel
    from ansible_collections.dstack.tee.agents.gateway import server  # pylint: disable=import-outside-toplevel

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    config = _load(args)
    rpc, admin = config["rpc"], config["admin"]
    if not rpc["listen"]:
        raise DstackError("rpc.listen", "is required for serve-control")
    server.attested_rpc_certificate(config)
    if not rpc["cert"]:
        raise DstackError("rpc.cert", "is required for serve-control (or rpc.guest_agent): the control API is served "
                                      "over TLS only (RegisterCvm authenticates CVMs by their client certificate)")
    print(f"dstack-gateway: control API on https://{rpc['listen']}/prpc/Gateway.*"
          + (f", Admin API on https://{admin['listen']}/prpc/Admin.*" if admin["listen"] else "")
          + f" (client certificates under {rpc['kms_root_ca']})", file=sys.stderr)
    server.run_control(config)
    return None


def _acme_manager(args):
    from ansible_collections.dstack.tee.agents.gateway import server  # pylint: disable=import-outside-toplevel
    from ansible_collections.dstack.tee.agents.gateway.service import GatewayService  # pylint: disable=import-outside-toplevel

    # No Admin API here: its listener (and so its token, which serve gets in its environment) is not needed.
    config = server.load_config(args.config, {"core.state_dir": args.state_dir, "admin.listen": ""})
    # A state directory made here, not left for the store to take its missing path for a file name.
    os.makedirs(config["core"]["state_dir"], mode=0o700, exist_ok=True)
    service = GatewayService(config)
    if service.acme is None:
        raise DstackError("core.certbot.enabled", f"is false in {args.config}: this gateway does not get its "
                                                  "certificate by ACME")
    return service.acme


def cmd_renew_cert(args):
    manager = _acme_manager(args)
    if args.name and args.name.lower().rstrip(".") != manager.name:
        from ansible_collections.dstack.tee.agents.gateway import custom_certs  # pylint: disable=import-outside-toplevel
        return custom_certs.renew_declared(manager.config, manager.store, manager, args.name, force=args.force)
    renewed, reason = manager.renew(force=args.force)
    return {"renewed": renewed, "reason": reason}


def cmd_set_txt(args):
    from ansible_collections.dstack.tee.agents.gateway import custom_certs, dns_provider, server  # pylint: disable=import-outside-toplevel

    config = server.load_config(args.config, {"core.state_dir": args.state_dir, "admin.listen": ""})
    certbot = config["core"]["certbot"]
    if not certbot["credentials"]:
        raise DstackError("core.certbot.credentials", f"is not set in {args.config}: set-txt writes the record "
                                                      "through the gateway's DNS provider and its credentials file")
    provider = dns_provider.open_provider(certbot["dns_provider"], certbot["credentials"])
    return custom_certs.set_app_address(provider, config["core"]["proxy"]["app_address_ns_prefix"], args.domain,
                                        args.app_id, args.port, check=args.check)


def cmd_set_caa(args):
    done, changed = _acme_manager(args).set_caa()
    return {"changed": changed, "records": {domain: [f"{flags} {tag} \"{value}\"" for flags, tag, value in records]
                                            for domain, records in done.items()}}


def _serve_flags(parser):
    parser.add_argument("--config", required=True, help="the gateway.toml")
    parser.add_argument("--state-dir", help="overrides core.state_dir")
    parser.add_argument("--listen", help="overrides rpc.listen (HOST:PORT)")
    parser.add_argument("--admin-listen", help="overrides admin.listen (HOST:PORT)")
    parser.add_argument("--workers", type=int, help="overrides rpc.workers (gunicorn worker processes)")


def build_parser():
    parser = argparse.ArgumentParser(prog="dstack-gateway", description="The dstack.tee gateway.")
    sub = parser.add_subparsers(dest="command", required=True)
    whole = sub.add_parser("serve", help="serve the whole gateway: WireGuard hub, control and Admin APIs, data plane")
    _serve_flags(whole)
    whole.set_defaults(func=cmd_serve)
    serve = sub.add_parser("serve-control", help="serve the control API (RegisterCvm, mutual TLS) and the Admin API")
    _serve_flags(serve)
    serve.set_defaults(func=cmd_serve_control)
    check = sub.add_parser("check-config", help="check gateway.toml and print it, secrets hidden")
    check.add_argument("--config", required=True, help="the gateway.toml")
    check.set_defaults(func=cmd_check_config)
    renew = sub.add_parser("renew-cert", help="[core.certbot]: order the wildcard certificate now if due (--force: now)")
    renew.add_argument("--config", required=True, help="the gateway.toml")
    renew.add_argument("--state-dir", help="overrides core.state_dir")
    renew.add_argument("--force", action="store_true", help="order a new certificate even if the current one is valid")
    renew.add_argument("--name", help="a custom domain a registered app declares (default: the wildcard)")
    renew.set_defaults(func=cmd_renew_cert)
    caa = sub.add_parser("set-caa", help="[core.certbot]: pin the domain's CAA records to the CA and the attested account")
    caa.add_argument("--config", required=True, help="the gateway.toml")
    caa.add_argument("--state-dir", help="overrides core.state_dir")
    caa.set_defaults(func=cmd_set_caa)
    txt = sub.add_parser("set-txt", help="a custom domain's TXT record <prefix>.DOMAIN = APP_ID:PORT through the DNS provider")
    txt.add_argument("--config", required=True, help="the gateway.toml")
    txt.add_argument("--state-dir", help="overrides core.state_dir")
    txt.add_argument("--domain", required=True, help="the custom domain, e.g. shop.example.com")
    txt.add_argument("--app-id", required=True, help="the app's app_id (40 hex digits)")
    txt.add_argument("--port", type=int, default=CUSTOM_DOMAIN_PORT,
                     help=f"the app's port the domain goes to (default {CUSTOM_DOMAIN_PORT})")
    txt.add_argument("--check", action="store_true", help="say what would change, change nothing")
    txt.set_defaults(func=cmd_set_txt)
    return parser


def main(argv=None):
    return run_cli("dstack-gateway", build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())

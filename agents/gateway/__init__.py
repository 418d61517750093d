# Copyright: dstack.tee contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The gateway: every app at https://<app-id>.<base_domain>, over WireGuard.

    config.py   gateway.toml + DSTACK_GATEWAY_* environment, checked at start
    store.py    SQLite state: instances, their WireGuard keys and IPs, port policies
    service.py  the decisions: RegisterCvm (identity only from the RA-TLS client certificate),
                Info, GetPeers, the Admin methods, peers applied through a WireGuard hub
    app.py      the Flask apps (control API, Admin API) and the client certificate under gunicorn
    cli.py      `dstack-gateway serve-control | check-config`
    sni.py, proxy.py, proxy_protocol.py   the data plane (SNI routes, the asyncio proxy, PROXY v2)
"""

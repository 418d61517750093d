# -*- coding: utf-8 -*-
# Copyright: dstack.tee contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""dstack's pRPC over HTTP(S) with JSON (dstack-reference 1.3): POST /prpc/<Service>.<Method>.

The one HTTP client the collection's modules and agents use to talk to the KMS and the VMM.
Errors name what failed: the URL that cannot be reached, or the method and the server's reason.
"""

import json
import urllib.error

from ansible.module_utils.urls import open_url

from ansible_collections.dstack.tee.plugins.module_utils.errors import DstackError


class Refused(DstackError):
    """The server answered 403: it understood and said no."""


class Unauthorized(DstackError):
    """The server answered 401: the token is missing or wrong."""


class PrpcClient:
    def __init__(self, url, service, field="url", ca_cert=None, token=None, timeout=30.0, validate_certs=True):
        self.url = url.rstrip("/")
        self.service = service
        self.field = field
        self.ca_cert = ca_cert
        self.token = token
        self.timeout = timeout
        self.validate_certs = validate_certs

    def call(self, method, params=None):
        headers = {"Content-Type": "application/json"}
        if self.token:
            headers["Authorization"] = "Bearer " + self.token
        try:
            with open_url(f"{self.url}/prpc/{self.service}.{method}", data=json.dumps(params or {}).encode("utf-8"),
                          method="POST", headers=headers, timeout=self.timeout, ca_path=self.ca_cert,
                          validate_certs=self.validate_certs, use_proxy=False) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as exc:
            try:
                reason = json.loads(exc.read()).get("error", "")
            except (ValueError, AttributeError):
                reason = exc.reason
            if exc.code == 401:
                raise Unauthorized(self.field, f"{method}: {reason or 'unauthorized'} (check the token)") from None
            if exc.code == 403:
                raise Refused(self.service.lower(), f"{method} refused: {reason}") from None
            raise DstackError(self.service.lower(), f"{method} failed with HTTP {exc.code}: {reason}") from None
        except (urllib.error.URLError, OSError) as exc:
            raise DstackError(self.field, f"cannot reach the {self.service} at {self.url}: "
                                          f"{getattr(exc, 'reason', exc)}") from None
        except ValueError:
            raise DstackError(self.service.lower(), f"{method} did not answer JSON") from None

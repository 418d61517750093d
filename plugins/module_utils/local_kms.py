# -*- coding: utf-8 -*-
# Copyright: dstack.tee contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""A KMS without a server, for `dstack-guest-agent simulate`: the root keys are held here, and the
guest's boot (agents/guest/boot.py) asks this client as it asks kms_client.KmsClient.

GetAppKey releases what the KMS releases (root_keys.RootKeys.app_key_payload) after the checks
that make the keys the measured app's: a fresh quote verified as the KMS verifies one
(attestation.QuoteTrust: the trust root, the TCB policy, report_data, the event log replayed
against RTMR3), and this KMS measured as the boot's key provider. There is no allowlist: the
local KMS is the app developer's own, and answers for any app its CVM measures.
"""

import os

from ansible_collections.dstack.tee.plugins.module_utils import attestation
from ansible_collections.dstack.tee.plugins.module_utils.errors import DstackError
from ansible_collections.dstack.tee.plugins.module_utils.tdx_quote import REPORT_DATA_SIZE


class LocalKmsClient:
    """KmsClient's get_meta and get_app_key over root keys held locally (root_keys.RootKeys).

    trust: the attestation.QuoteTrust the quotes are verified under (the simulated platform's).
    """

    def __init__(self, keys, trust, url="local"):
        self.keys = keys
        self.trust = trust
        self.url = url  # names the key provider in the CVM's app keys, as a KMS URL does

    def get_meta(self):
        return {"ca_cert": self.keys.ca_cert_pem, "k256_pubkey": self.keys.k256_pubkey.hex()}

    def get_app_key(self, provider, event_log, vm_config=""):  # pylint: disable=unused-argument
        """The measured app instance's keys, from a fresh quote of `provider` over `event_log`."""
        # Random report_data stands for the KMS's nonce: the quote is this boot's, now.
        report_data = os.urandom(REPORT_DATA_SIZE)
        result = self.trust.verify(provider.get_quote(report_data), event_log, report_data)
        if not result.ok:
            failed = result.failures[0]
            raise DstackError(failed.name, failed.detail)
        boot = result.boot_info
        if not attestation.measured_kms(boot, self.keys.key_provider_id):
            raise DstackError("key_provider", "the CVM did not measure this KMS as its key provider "
                                              "(key-provider event before boot-mr-done)")
        return self.keys.app_key_payload(boot["app_id"], boot["instance_id"], boot["os_image_hash"])

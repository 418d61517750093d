"""A no_tee VM's guest verifies other CVMs' quotes (the gateway's RA-TLS) under the simulated platform
its host signs with: the quote channel's `platform` op gives the platform's root CA and collateral,
and the boot's gateway trust is built from them (simulation mode), not from Intel's root."""

from ansible_collections.dstack.tee.agents.guest.boot import Boot
from ansible_collections.dstack.tee.agents.guest.context import GuestContext
from ansible_collections.dstack.tee.plugins.module_utils import attestation
from ansible_collections.dstack.tee.plugins.module_utils.tdx_sim import SimTdx
from test_quote_channel import sim, vm  # noqa: F401  pylint: disable=unused-import


def test_the_platform_op_gives_the_hosts_simulated_root_and_collateral(vm, sim, tmp_path):  # noqa: F811
    root_ca, collateral = vm.platform_trust()
    assert root_ca == sim.root_ca_der
    # Another CVM of the same host (the gateway's) quotes; the guest's view of the platform verifies it.
    other = SimTdx(sim.state_dir, rtmr_state=str(tmp_path / "gateway-rtmrs.json"))
    quote = other.get_quote(b"\x07" * 64)
    assert attestation.verify_quote(quote, attestation.load_collateral(collateral), root_ca_der=root_ca).ok


def test_in_a_no_tee_vm_the_gateways_quotes_are_checked_under_the_hosts_platform(vm, sim, tmp_path):  # noqa: F811
    (tmp_path / "share").mkdir()
    ctx = GuestContext.open(str(tmp_path / "share"), str(tmp_path / "work"), tee="sim", sim_state_dir=sim.state_dir)
    ctx.provider = vm   # what --tee auto opens in a no_tee VM
    settings = Boot(ctx)._quote_trust_settings()  # pylint: disable=protected-access
    assert settings["mode"] == "simulation" and "sim_state_dir" not in settings
    trust = attestation.QuoteTrust(settings, str(tmp_path / "work"))
    assert trust.root_ca_der == sim.root_ca_der and trust.attestation_mode == attestation.MODE_SIM
    quote = sim.get_quote(b"\x09" * 64)
    assert attestation.verify_quote(quote, trust.collateral(quote), root_ca_der=trust.root_ca_der).ok

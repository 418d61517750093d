"""The app's images from the config share (images/*.tar, docker-archive): the boot loads each with the
app's engine before compose up; a tarball the engine cannot load fails the containers step naming
the file, and no container is started. (The good path runs in a VM:
test_guest_vm_boot.test_an_app_boots_in_the_vm_with_keys_from_the_kms.)"""

import pytest

from ansible_collections.dstack.tee.agents.guest.boot import Boot, BootFailed
from ansible_collections.dstack.tee.agents.guest.context import GuestContext
from ansible_collections.dstack.tee.plugins.module_utils.compose_runner import ComposeRunner
from conftest import free_port, needs_podman
from test_guest_boot import allow, make_share, world  # noqa: F401  pylint: disable=unused-import


@needs_podman
def test_a_tarball_podman_cannot_load_fails_the_containers_step_naming_it(tmp_path, module, world):  # noqa: F811
    sim, _kms_app, kms_client = world
    share, app = make_share(tmp_path, module, kms_client)
    allow(tmp_path, app)
    (share / "images").mkdir()
    (share / "images" / "broken.tar").write_bytes(b"not an image archive\n" * 64)
    ctx = GuestContext.open(str(share), str(tmp_path / "work"), tee="sim", sim_state_dir=sim.state_dir)
    sock = tmp_path / "dstack.sock"
    sock.touch()
    runner = ComposeRunner(f"dstack-test-{free_port()}", str(tmp_path / "work"), engine="podman")
    try:
        with pytest.raises(BootFailed) as err:
            Boot(ctx, kms_client=kms_client, runner=runner, sockets={"dstack": str(sock)}).run()
        assert err.value.field == "containers"
        assert err.value.reason.startswith("images/broken.tar: podman load failed (exit 125)"), err.value.reason
        assert runner.ps() == []
    finally:
        runner.down()

"""KMS configuration: kms.toml, then DSTACK_KMS_* environment, then flags; errors name the setting."""

import pytest

from ansible_collections.dstack.tee.agents.kms.config import load_config
from ansible_collections.dstack.tee.agents.kms.auth import make_backend
from ansible_collections.dstack.tee.plugins.module_utils.errors import DstackError


def test_file_then_environment_then_flags(tmp_path):
    toml = tmp_path / "kms.toml"
    toml.write_text('state_dir = "/srv/kms"\nmode = "production"\nnonce_ttl = 30\n[auth]\ntype = "webhook"\n'
                    'url = "http://auth:8000"\n[policy]\nallowed_tcb_statuses = ["UpToDate", "SWHardeningNeeded"]\n')
    config = load_config(str(toml), environ={"DSTACK_KMS_MODE": "simulation", "DSTACK_KMS_AUTH_TIMEOUT": "2"},
                         listen="127.0.0.1:9201")
    assert config["state_dir"] == "/srv/kms" and config["mode"] == "simulation" and config["nonce_ttl"] == 30
    assert config["auth"] == {"type": "webhook", "url": "http://auth:8000", "timeout": "2"}
    assert config["listen"] == "127.0.0.1:9201" and config["sim_state_dir"] == "/srv/kms/tdx-sim"
    assert config["policy"]["allowed_tcb_statuses"] == ["UpToDate", "SWHardeningNeeded"]
    flagged = load_config(str(toml), environ={}, state_dir=str(tmp_path / "other"))
    assert flagged["state_dir"] == str(tmp_path / "other") and "sim_state_dir" not in flagged


@pytest.mark.parametrize("text, environ, field", [
    ("mode = 'simulation'\n", {}, "state_dir"),
    ("state_dir = \n", {}, "config"),
])
def test_bad_configuration_names_the_setting(tmp_path, text, environ, field):
    (tmp_path / "kms.toml").write_text(text)
    with pytest.raises(DstackError) as err:
        load_config(str(tmp_path / "kms.toml"), environ=environ)
    assert err.value.field == field


@pytest.mark.parametrize("auth, field", [
    ({"type": "local"}, "auth.path"), ({"type": "webhook"}, "auth.url"), ({"type": "ethereum"}, "auth.rpc_url"),
    ({"type": "ldap"}, "auth.type")])
def test_auth_backend_settings(auth, field):
    with pytest.raises(DstackError) as err:
        make_backend(auth)
    assert err.value.field == field


def test_access_log_is_on_unless_turned_off(tmp_path):
    toml = tmp_path / "kms.toml"
    toml.write_text('state_dir = "/srv/kms"\n')
    assert load_config(str(toml), environ={})["access_log"] is True
    toml.write_text('state_dir = "/srv/kms"\naccess_log = false\n')
    assert load_config(str(toml), environ={})["access_log"] is False
    assert load_config(str(toml), environ={"DSTACK_KMS_ACCESS_LOG": "yes"})["access_log"] is True
    assert load_config(str(toml), environ={"DSTACK_KMS_ACCESS_LOG": "on"}, access_log=False)["access_log"] is False
    with pytest.raises(DstackError) as err:
        load_config(str(toml), environ={"DSTACK_KMS_ACCESS_LOG": "sometimes"})
    assert err.value.field == "access_log" and "sometimes" in err.value.reason

"""Fixed vectors of what the KMS derives, signs and seals, recorded from the code before the
speed work of issue 16 (caching, coincurve): every output must stay byte-identical.

The inputs are fixed (the root keys come from fixed seeds, the CA certificate is recorded); the
outputs were computed once by the KMS of commit ae07fea and pasted here. Caches must not change
them, and a second call (answered from a cache) must give the same bytes as the first.
"""

import hashlib
import json
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from ansible_collections.dstack.tee.plugins.module_utils import root_keys
from ansible_collections.dstack.tee.agents.kms.nonces import mac_key
from ansible_collections.dstack.tee.plugins.module_utils import app_certs, kdf, key_release
from ansible_collections.dstack.tee.plugins.module_utils.tdx_sim import SimTdx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "integration"))  # make_kms, boot
from test_kms import APP_ID as SIM_APP_ID, INSTANCE_ID as SIM_INSTANCE_ID, VM_CONFIG, boot, make_kms  # noqa: E402

CA_SCALAR = hashlib.sha256(b"kms-vector-ca").digest()
K256 = hashlib.sha256(b"kms-vector-k256").digest()
EPHEMERAL = hashlib.sha256(b"kms-vector-ephemeral").digest()
APP_ID = bytes(range(1, 21)).hex()
INSTANCE_ID = "ab" * 20
TIMESTAMP = 1700000000

CA_CERT_PEM = """\
-----BEGIN CERTIFICATE-----
MIIBdDCCARqgAwIBAgIUThAT4LwVSeki+96unnX6rLz+1TQwCgYIKoZIzj0EAwIw
GDEWMBQGA1UEAwwNRHN0YWNrIEtNUyBDQTAeFw0yNjExMzAwMTUzMDRaFw0zNjEx
MjcwMTU4MDRaMBgxFjAUBgNVBAMMDURzdGFjayBLTVMgQ0EwWTATBgcqhkjOPQIB
BggqhkjOPQMBBwNCAARo8p3vTZURhZB7I0Uu4vYAImzv+pfXi+3bGWcVFGi4HBHS
hWTexLbBXlBaEGBl5oGCPd3AoeRb0scFWpphtlsUo0IwQDAPBgNVHRMBAf8EBTAD
AQH/MA4GA1UdDwEB/wQEAwIBhjAdBgNVHQ4EFgQUsY6bP/AR+e59N6nxxoBOk8+t
+4owCgYIKoZIzj0EAwIDSAAwRQIgFMa3/QSzDRx5a2MZkwgLKUQ76CSMzONxXKbC
P9kDPYwCIQCt/g0w9hI5r9wkpwtgOcXjTWnmYkFhW82Gpm+2riF8mw==
-----END CERTIFICATE-----
"""

K256_PUBKEY = "03ee8572b9da29c9620bd5c9fe80c0151e8b0c05bb956490f965de7bf745b1d00d"

APP_KEYS = {
    "disk_crypt_key": "4bf1ccde85590f12e37c71b8d229e8ea1f30b05b8147a9b7a7544c62d84ecbd8",
    "env_crypt_key": "4dc9fb2e36530ceee9768b799f8ff56019aa9c7b4b12979f980689d285330542",
    "k256_key": "eb96e0c0ba41ae9156ee6a980b53b5434f5d5d7e0a05fc77b74bc54f3376a04d",
    "k256_signature": ("ec83eee45e240d5cd41d9fa93102c07e7ffeabbf22c1325a6dfc5b4be4cf702e6c"
                       "b429ac8f99267f3907ac8f1a17ab801a13739f945e826f44416a29ab741b4500"),
}

APP_KEYS_NO_INSTANCE = {
    "disk_crypt_key": "eb2731ef3c84fb15ddc15aada71346d5c393c8fc073b45850badb49d49b3e5e5",
    "env_crypt_key": "4dc9fb2e36530ceee9768b799f8ff56019aa9c7b4b12979f980689d285330542",
    "k256_key": "eb96e0c0ba41ae9156ee6a980b53b5434f5d5d7e0a05fc77b74bc54f3376a04d",
    "k256_signature": ("ec83eee45e240d5cd41d9fa93102c07e7ffeabbf22c1325a6dfc5b4be4cf702e6c"
                       "b429ac8f99267f3907ac8f1a17ab801a13739f945e826f44416a29ab741b4500"),
}

ENV_PUBLIC_KEY = "b15dbc7758a160f545598cccfacc150bd3b2ec35e9092df3dec5ac93e4e6ba24"

ENV_SIGNATURE = (
    "91047e1a186e754ebbb8aba872cc10fbe33414f05b40a74a80eae78ae27f255348c2e2c51e069a65085eb1ed6be74744"
    "7065e5750d23362888214e4c36d154d201"
)

ENV_SIGNATURE_V1 = (
    "0555fd80dd0a0c6321bc8a4cf3feebee71c824bf2528bab7f2d09be0295899b847ba21e63b4354aaf6f36938484858b3"
    "04b5f30a6db6693376054c69471c762400"
)

GET_KEY = "4acc1f74cfc8d79f918119885f25c810c3494d13c851a78b47342258abf157ba"

GET_KEY_CHAIN0_K256 = (
    "dfac617bf6f4b89b4a39adc9b1e2f367dbd81eb6be5c5d7db9cf63fbd36a611c5d05c64927074cf5c76136f6628ff1e6"
    "4ec5b326793ada3254327b245426505801"
)

GET_KEY_CHAIN0_ED25519 = (
    "978febf15d2db1ec47cf22145b903d99e46f95be23dbdc21312f22eb7113bdaf1be9696a663c449d189917702c50b72d"
    "c0e82c08583bf9e323bcffb67980dece00"
)

APP_CA_SCALAR = "18ac0e3df133f6115fc098329fd9aeb7dd8e26ea34cdb979ef03c5657cb7da44"

NONCE_MAC_KEY = "4e0e261cf9d9d97a3dde10ae0cbb77200a8006827944c7c1141685c70b2711eb"

KEY_PROVIDER_ID = (
    "3059301306072a8648ce3d020106082a8648ce3d0301070342000468f29def4d951185907b23452ee2f600226ceffa97"
    "d78beddb1967151468b81c11d28564dec4b6c15e505a106065e681823dddc0a1e45bd2c7055a9a61b65b14"
)

SEALED_NONCE = "000000006b0cd8680f0a02584b2e9500d2ed3bec908279483e610868fdc12ab2"

SEALED_ANSWER = {
    "kms_public_key": "2ede9d4b570c658aa54df2a9ad24352880eb355ff688503aed8ac8fc5e59770b",
    "iv": "b7508c7e682f0e956de9034d",
    "ciphertext": (
        "553450511fc59154b5c52e0023f9507e14296881ad851a987b7a6d3b39966d233eb967c1dd18292a9df905ba81765322"
        "e352e7a454b28f2d3017f730af3cf6eb3bd70951e4e153affd10751d2c23b377a82dc958b1bc6e5fcab1b655c8f40228"
        "a3f1730a9043cdbc93e856a5ef856888cc911f8e7ad07bd373f2076fe95b2cf5cbf3a107c82903ab96f6cb63f8fc867d"
        "936453bde1e1e1f849d8ba84a99d09d90f52241d715249cbed19f9342175fad63e0819af5423be44e0998e9a6641397f"
        "90b798d11034df56053472a9d93ac12fb2856ff7cd6fb04ac5927f8d4e5e539792334ddc3e4bb17537a16daf8a2a8a63"
        "e547b3469bb70b9b0307f99c6d806b9d478ec65f09dab37ead4561ac8f15a2fc089082113da17279d0d738dc9cbf46dd"
        "391fb6a205ccb7abf88d257de59c12da6473953c3093532263fb37731a58f809d223468d0728b9c8d88c577cc2f59c1e"
        "3f70b3deda37ac6dfa08aa5b9cd02b809113e1dedac001273bd058ab2860cda010910f6eaa1c94067da14620cc459ec9"
        "c7a9f539b6d7c1917c43540ffc6475e58f6267364edaf7c11fa1421e57c7168fd6d8533da389d7df8ca10ee5381e9d77"
        "4e56b1bbb943b9ee026c6ec82727ea43e6a245b9933044c3ed7b1e514130daee832506e61fa273b2bf036df65fe48a39"
        "f43dc19eb40e9516d60ba7c67c471e0298f2caf5dbbf7f5f6b09cc12e34f067ae8903f4d3ec06e0d98e6934318a5be48"
        "4333a4fdf5a158160a09161ffa1af88c46cac8dc6869707998ac35bea872e56b20f3edbc993a82d4632101e9b47cdb22"
        "5f264b64d43a71917446c66562e06ff6f9a6e0f90843e4ee78f35d84f73db2bea21a7ad10c62b614d0732f4856875cf0"
        "4cbb8bc293d2fda9023505b7fa0232ae929d602a2a01b95157d18392e4d99280538110ceb49cda4faa6ec11adcdca8bb"
        "6a71b4a20c06d9732ec747672e45ed84ffa4b1f64d76a8596d5aa7cb292da99cb71dc8d607bdd85eebecb6789e5095b7"
        "f81457720c393684ffbf174db324c4bc44a8a2dbaf3ccfa56c653194bd6ea0b633ed2331c823d0fa697e14cec9f7e195"
        "b3dae6544ad59235748e210a3e45fe48bc06f7c2ac0a6af176b2d04a421369495d23bd02b18b55174ac8580db0387481"
        "1ded37cebce33f7b5e41e96123c4afc396b6bb5932f916a3d0a76d5edc28e3a607421d6af669ae90c46354d0151d4fa9"
        "3ee9d72e0d31a4a0df8bbc5d734d14d32dc2c155d2e3607c7981f8df11629bf767327f4ce0f987655f8c6f0a0f458b45"
        "8eee3fe28b19b77d502aaef74ce22a6b90411de0f09b53b546688b2f1396699301586b59cffab2f85d97ec35b744738c"
        "cc077eb2b70b9eb49fc7bb7b4a9447d4c389e89ec91f07e5a7db7db6cc5a3b97b6cbd03984da21fff1cad9b73278ef3e"
        "a477824bc5cf86a34f7a88ff0100cee57b3219c76f76c6fd5472610316ac50655f9089a61f1166f5ee4529c5a0563009"
        "686f2524026305ce60161d60ae7b5ba4ed7e73260e97a720fe9088510b76d93549f3265c335f7b74603fce991e7b3f39"
        "5c6ad047c728c4ea3b4bfd302fcd0b7db248c0f01b23bd49ecc649777994f7038be496692ea7f8468d6c0914c71375f3"
        "8820cde3c5129bf96f068b6dff5d218b6ffc91eb9a2137769b4337ba6c9802432540af94e65f48125b520529d8265c4c"
        "8c7983f4a4bebf304893601432b11bcbfcfaafbe250312226e12234c837c7cdf54cdc831890388197ecb34b5b8267036"
        "c5d38cb76e8cb90f74e7a25bc456b2a4679f0494743aff76753e22d4d3ef239c90eec99e61e8a7a5a59db9a54e75f53e"
        "0e431654cdba905e8366c4984c5cd4a673fdf81ec2e024d3bcafa0669913d28f7b0ed0cbc0c548ec81d2de0b68ed292f"
        "3816d06f6b6747413c819f3f384ff3ecf5d83b"
    ),
}

SEALED_PLAINTEXT = (
    "{\"ca_cert\": \"-----BEGIN CERTIFICATE-----\\nMIIBdDCCARqgAwIBAgIUThAT4LwVSeki+96unnX6rLz+1TQw"
    "CgYIKoZIzj0EAwIw\\nGDEWMBQGA1UEAwwNRHN0YWNrIEtNUyBDQTAeFw0yNjExMzAwMTUzMDRaFw0zNjEx\\nMjcwMT"
    "U4MDRaMBgxFjAUBgNVBAMMDURzdGFjayBLTVMgQ0EwWTATBgcqhkjOPQIB\\nBggqhkjOPQMBBwNCAARo8p3vTZURhZ"
    "B7I0Uu4vYAImzv+pfXi+3bGWcVFGi4HBHS\\nhWTexLbBXlBaEGBl5oGCPd3AoeRb0scFWpphtlsUo0IwQDAPBgNVHR"
    "MBAf8EBTAD\\nAQH/MA4GA1UdDwEB/wQEAwIBhjAdBgNVHQ4EFgQUsY6bP/AR+e59N6nxxoBOk8+t\\n+4owCgYIKoZI"
    "zj0EAwIDSAAwRQIgFMa3/QSzDRx5a2MZkwgLKUQ76CSMzONxXKbC\\nP9kDPYwCIQCt/g0w9hI5r9wkpwtgOcXjTWnm"
    "YkFhW82Gpm+2riF8mw==\\n-----END CERTIFICATE-----\\n\", \"disk_crypt_key\": \"6abd347a9cc5c3fd107"
    "123d62db46f809ec464f001cf5e39b2489a9db9a5a187\", \"env_crypt_key\": \"0350747d5daa89b8e5ea5116"
    "a7ee3099ee3e899a9b3e956ad4392010f46e26f3\", \"gateway_app_id\": \"\", \"k256_key\": \"c450ae4b584a"
    "e5e4e7d7bbbc0ced46d143029121c95ddb92e02b46b3c47baa45\", \"k256_signature\": \"fde1bbf551de5118"
    "1d31acb4296b4b20c0c615f6bd07ae8dad15724b38de52b938388efd3749facc3442f7666dff4f3c3860051929"
    "5d283e7895c7e13a788cdf00\", \"key_provider\": {\"id\": \"3059301306072a8648ce3d020106082a8648ce3"
    "d0301070342000468f29def4d951185907b23452ee2f600226ceffa97d78beddb1967151468b81c11d28564dec"
    "4b6c15e505a106065e681823dddc0a1e45bd2c7055a9a61b65b14\", \"name\": \"kms\"}, \"os_image_hash\": \""
    "1111111111111111111111111111111111111111111111111111111111111111\", \"tproxy_app_id\": \"\"}"
).encode()


@pytest.fixture(scope="module")
def keys():
    return root_keys.RootKeys(kdf.p256_from_scalar(CA_SCALAR), x509.load_pem_x509_certificate(CA_CERT_PEM.encode()),
                              K256)


def _hex(keys_):
    return {name: getattr(keys_, name).hex() for name in APP_KEYS}


def test_derive_app_keys_vector(keys):
    for _round in range(2):  # the second round may come from a cache: same bytes
        assert _hex(kdf.derive_app_keys(keys.ca_key, keys.k256_key, APP_ID, INSTANCE_ID)) == APP_KEYS
        assert _hex(kdf.derive_app_keys(keys.ca_key, keys.k256_key, bytes.fromhex(APP_ID), "")) == APP_KEYS_NO_INSTANCE
    assert kdf.p256_scalar(kdf.app_ca_key(keys.ca_key, APP_ID)).hex() == APP_CA_SCALAR
    assert keys.k256_pubkey.hex() == K256_PUBKEY
    assert mac_key(keys.ca_key).hex() == NONCE_MAC_KEY
    assert app_certs.key_provider_id(keys.ca_cert) == KEY_PROVIDER_ID


def test_env_pubkey_signatures_vector(keys):
    expected = {"public_key": ENV_PUBLIC_KEY, "signature": ENV_SIGNATURE, "timestamp": TIMESTAMP,
                "signature_v1": ENV_SIGNATURE_V1}
    for _round in range(2):
        assert keys.env_pubkey_response(APP_ID, now=TIMESTAMP) == expected
    # Another time gives another v1 signature (the timestamp is signed), the same legacy one.
    later = keys.env_pubkey_response(APP_ID, now=TIMESTAMP + 1)
    assert later["signature"] == ENV_SIGNATURE and later["signature_v1"] != ENV_SIGNATURE_V1
    assert kdf.verify_env_pubkey(ENV_PUBLIC_KEY, APP_ID, K256_PUBKEY, ENV_SIGNATURE_V1, TIMESTAMP,
                                 now=TIMESTAMP) == "v1"


def test_get_key_chain_vector(keys):
    app_k256 = bytes.fromhex(APP_KEYS["k256_key"])
    for algorithm, chain0 in (("secp256k1", GET_KEY_CHAIN0_K256), ("ed25519", GET_KEY_CHAIN0_ED25519)):
        key, signature = kdf.get_key(app_k256, "wallet/eth", "signing", algorithm)
        assert (key.hex(), signature.hex()) == (GET_KEY, chain0)
        app_pub = kdf.verify_key_chain(key, "signing", algorithm, [chain0, APP_KEYS["k256_signature"]], APP_ID,
                                       K256_PUBKEY)
        assert app_pub == kdf.k256_public_key(app_k256)


def _ephemeral():
    private = X25519PrivateKey.from_private_bytes(EPHEMERAL)
    return private, private.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _plaintext(answer, nonce, private):
    """The sealed answer's raw plaintext bytes (open_sealed parses them; the bytes are compared here)."""
    shared = private.exchange(X25519PublicKey.from_public_bytes(bytes.fromhex(answer["kms_public_key"])))
    return AESGCM(key_release._aead_key(shared, nonce)).decrypt(  # pylint: disable=protected-access
        bytes.fromhex(answer["iv"]), bytes.fromhex(answer["ciphertext"]), nonce)


def test_recorded_sealed_answer_opens_with_the_fixed_key():
    private, _public = _ephemeral()
    nonce = bytes.fromhex(SEALED_NONCE)
    assert key_release.open_sealed(SEALED_ANSWER, nonce, private) == json.loads(SEALED_PLAINTEXT)
    assert _plaintext(SEALED_ANSWER, nonce, private) == SEALED_PLAINTEXT


def test_kms_seals_the_recorded_answer(tmp_path, keys):
    """GetAppKey through the KMS with the fixed root keys: the sealed payload's bytes are the recorded
    ones, for a first release and for one answered from the KMS's caches; GetMeta likewise."""
    root_keys.install(str(tmp_path / "kms"), *root_keys.pem_forms(keys))
    sim = SimTdx(str(tmp_path / "sim"))
    app, client = make_kms(tmp_path, sim)
    service = app.extensions["dstack_kms"]
    meta = client.call("GetMeta")
    assert (meta["ca_cert"], meta["k256_pubkey"]) == (CA_CERT_PEM, K256_PUBKEY)
    assert service.key_provider_id() == KEY_PROVIDER_ID
    private, public = _ephemeral()
    event_log = boot(sim)
    # The recorded release was for test_kms's app and instance (the sealed keys are theirs).
    assert (SIM_APP_ID, SIM_INSTANCE_ID) == ("641a9031f1435ede78cad615490ab62852e499f7", INSTANCE_ID)
    sealed_keys = json.loads(SEALED_PLAINTEXT)
    assert _hex(kdf.derive_app_keys(keys.ca_key, K256, SIM_APP_ID, SIM_INSTANCE_ID)) == {
        name: sealed_keys[name] for name in APP_KEYS}
    for _round in range(2):
        nonce = bytes.fromhex(client.call("GetNonce")["nonce"])
        quote = sim.get_quote(key_release.key_release_report_data(nonce, public))
        answer = client.call("GetAppKey", {"nonce": nonce.hex(), "ephemeral_public_key": public.hex(),
                                           "quote": quote.hex(), "event_log": event_log, "vm_config": VM_CONFIG})
        assert _plaintext(answer, nonce, private) == SEALED_PLAINTEXT
    assert client.call("GetMeta") == meta
    answer = client.call("GetAppEnvEncryptPubKey", {"app_id": APP_ID})
    assert answer["public_key"] == ENV_PUBLIC_KEY and answer["signature"] == ENV_SIGNATURE
    assert kdf.verify_env_pubkey(answer["public_key"], APP_ID, K256_PUBKEY, answer["signature_v1"],
                                 answer["timestamp"]) == "v1"

"""Collateral from a PCCS is cached per FMSPC and CA until its nextUpdate, then fetched again."""

import json
from pathlib import Path

import pytest

from ansible_collections.dstack.tee.plugins.module_utils import attestation as at
from ansible_collections.dstack.tee.plugins.module_utils.errors import DstackError

TESTDATA = Path(__file__).resolve().parents[1] / "data" / "tdx"  # real Intel TDX evidence (README there)
PINNED = 1750331763
NEXT_UPDATE = 1752920163  # 2025-07-19T10:16:03Z, the TCB info's nextUpdate (QE identity's is later)


@pytest.fixture
def sample():
    return (TESTDATA / "tdx_quote").read_bytes(), json.loads((TESTDATA / "tdx_quote_collateral.json").read_text())


def test_cached_until_next_update(tmp_path, sample):
    quote, collateral = sample
    fetched = []

    def fetch(raw):
        fetched.append(raw)
        return collateral

    cache = at.CollateralCache(str(tmp_path / "cache"), "https://pccs.invalid", fetch=fetch)
    assert cache.get(quote, now=PINNED) == collateral
    assert cache.get(quote, now=PINNED + 60) == collateral
    assert len(fetched) == 1
    assert [p.name for p in (tmp_path / "cache").iterdir()] == ["b0c06f000000-platform.json"]
    # A fresh cache object reads the file, still without fetching.
    again = at.CollateralCache(str(tmp_path / "cache"), "https://pccs.invalid", fetch=fetch)
    assert again.get(quote, now=NEXT_UPDATE - 1) == collateral and len(fetched) == 1
    assert again.get(quote, now=NEXT_UPDATE + 1) == collateral and len(fetched) == 2
    # What the cache returns verifies like the file itself.
    assert at.verify_quote(quote, cache.get(quote, now=PINNED), now=PINNED).ok


def test_a_corrupt_cache_file_is_fetched_again(tmp_path, sample):
    quote, collateral = sample
    (tmp_path / "b0c06f000000-platform.json").write_text("{broken")
    fetched = []
    cache = at.CollateralCache(str(tmp_path), "https://pccs.invalid", fetch=lambda raw: fetched.append(1) or collateral)
    assert cache.get(quote, now=PINNED) == collateral and fetched == [1]


def test_an_unreachable_pccs_is_a_named_error(tmp_path, sample):
    quote, _collateral = sample
    cache = at.CollateralCache(str(tmp_path), "http://127.0.0.1:9")  # the real fetch path, nothing listening
    with pytest.raises(DstackError) as err:
        cache.get(quote, now=PINNED)
    assert err.value.field == "pccs_url" and "127.0.0.1:9" in err.value.reason


def test_bad_collateral_is_named(tmp_path):
    with pytest.raises(DstackError, match="^collateral: is not DCAP collateral JSON"):
        at.load_collateral('{"tcb_info": 1}')
    with pytest.raises(DstackError, match="^collateral: cannot read"):
        at.load_collateral(str(tmp_path / "absent.json"))

"""Fixtures of the contract tests (see evm_helpers.py)."""

from evm_helpers import chain, setup  # noqa: F401  pylint: disable=unused-import

"""A local development chain: ganache from contracts/node_modules on a loopback port.

One home for starting it, used by the tests (tests/conftest.py: ganache_chain) and by
bench/bench_kms.py --ethereum. Not for production: the chain lives as long as the process.

    with DevChain() as chain:       # chain.url, chain.w3 (web3), chain.fund(address)
        ...
"""

import shutil
import socket
import subprocess
import time
from pathlib import Path

GANACHE = Path(__file__).resolve().parent / "node_modules" / "ganache" / "dist" / "node" / "cli.js"
CHAIN_ID = 1337


class DevChainUnavailable(RuntimeError):
    """node or ganache is missing: `cd contracts && npm ci` (scripts/setup.sh --test does it)."""


class DevChain:
    def __init__(self, chain_id=CHAIN_ID, start_timeout=30.0):
        self.chain_id = chain_id
        self.start_timeout = start_timeout
        self.proc = None
        self.url = None
        self.w3 = None

    def start(self):
        from web3 import Web3  # pylint: disable=import-outside-toplevel
        node = shutil.which("node")
        if not GANACHE.exists():
            raise DevChainUnavailable(f"{GANACHE} is missing (cd contracts && npm ci)")
        if not node:
            raise DevChainUnavailable("node is not installed (ganache needs it)")
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        self.proc = subprocess.Popen([node, str(GANACHE), "--host", "127.0.0.1", "--port", str(port),  # pylint: disable=consider-using-with
                                      "--wallet.deterministic", "--chain.chainId", str(self.chain_id),
                                      "--logging.quiet"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.url = f"http://127.0.0.1:{port}"
        self.w3 = Web3(Web3.HTTPProvider(self.url))
        deadline = time.monotonic() + self.start_timeout
        while True:
            try:
                if self.w3.eth.chain_id == self.chain_id:
                    return self
            except Exception:  # pylint: disable=broad-except
                pass
            if time.monotonic() > deadline or self.proc.poll() is not None:
                self.stop()
                raise RuntimeError("ganache did not start")
            time.sleep(0.2)

    def fund(self, address, wei=10 ** 20):
        """Send wei from ganache's first (deterministic, rich) account."""
        self.w3.eth.wait_for_transaction_receipt(self.w3.eth.send_transaction(
            {"from": self.w3.eth.accounts[0], "to": address, "value": wei}))

    def stop(self):
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

# A package, so that tests/security/test_vmm.py and tests/integration/test_vmm.py (and other
# test_<area>.py twins) can be collected in one pytest run: without it both would be module
# "test_vmm" and pytest refuses the second ("import file mismatch").

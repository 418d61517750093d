# The two commands of the README.  Both set up what they need first (scripts/setup.sh).
SHELL := /bin/bash
VENV := .venv
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
export ANSIBLE_CONFIG := $(CURDIR)/ansible.cfg

.PHONY: demo test setup setup-test sanity pytest stop clean

## make demo: set up, then run the main job on the simulated default (see README)
demo: setup
	ansible-playbook playbooks/demo.yml

## make test: set up, then run every test (pytest, ansible-test sanity)
test: setup-test
	scripts/run-tests.sh

setup:
	scripts/setup.sh

setup-test:
	scripts/setup.sh --test

pytest: setup-test
	$(VENV)/bin/python -m pytest

sanity: setup-test
	scripts/ansible-sanity.sh

## make stop: stop what make demo started (the CVMs first: their containers go down with them)
stop:
	-$(VENV)/bin/supervisorctl -c .demo/run/supervisor/supervisord.conf shutdown
	-$(VENV)/bin/supervisorctl -c .demo/services/supervisord.conf shutdown

## make clean: remove .demo/ (stop first) and the network namespaces of its CVMs and gateway
clean:
	-for vm in .demo/run/*/; do [ -d "$$vm" ] && ip netns del "dstack-$$(basename "$$vm")" 2>/dev/null; done; true
	-ip netns del dstack-gateway 2>/dev/null; true
	rm -rf .demo build test-artifacts

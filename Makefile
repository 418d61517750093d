# The two commands of the README.  Both set up what they need first (scripts/setup.sh).
SHELL := /bin/bash
VENV := .venv
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
export ANSIBLE_CONFIG := $(CURDIR)/ansible.cfg

.PHONY: demo test setup setup-test setup-fleet sanity pytest stop clean fleet-demo fleet-down

# make demo's settings (README: "The two commands"), on make's command line: make demo VMM_PORT=9180.
# An empty port is the role's default. Defined here, so that an environment variable of the same
# name does not change the demo.
DEMO_ROOT = .demo
VMM_PORT =
KMS_PORT =
APP_PORT =
GATEWAY_PORT =
GATEWAY_RPC_PORT =
GATEWAY_ADMIN_PORT =
GATEWAY_WG_PORT =
ACME_PORT =
ACME_MANAGEMENT_PORT =
DNS_PORT =
ARGS =
STOP_TIMEOUT = 90
# The same addresses as the roles' defaults; only the ports change.
# (dstack_root only for another DEMO_ROOT: the roles' default names .demo as ansible-playbook does.)
DEMO_VARS = $(if $(filter-out .demo,$(DEMO_ROOT)),-e dstack_root=$(abspath $(DEMO_ROOT))) \
	$(if $(KMS_PORT),-e dstack_kms_listen=127.0.0.1:$(KMS_PORT) -e dstack_kms_url=https://127.0.0.1:$(KMS_PORT)) \
	$(if $(VMM_PORT),-e dstack_vmm_listen=127.0.0.1:$(VMM_PORT) -e dstack_vmm_url=http://127.0.0.1:$(VMM_PORT)) \
	$(if $(APP_PORT),-e dstack_app_host_port=$(APP_PORT)) \
	$(if $(GATEWAY_PORT),-e dstack_gateway_proxy_listen_port=$(GATEWAY_PORT)) \
	$(if $(GATEWAY_RPC_PORT),-e dstack_gateway_rpc_listen=0.0.0.0:$(GATEWAY_RPC_PORT)) \
	$(if $(GATEWAY_ADMIN_PORT),-e dstack_gateway_admin_listen=127.0.0.1:$(GATEWAY_ADMIN_PORT)) \
	$(if $(GATEWAY_WG_PORT),-e dstack_gateway_wg_listen_port=$(GATEWAY_WG_PORT)) \
	$(if $(ACME_PORT),-e dstack_acme_lab_pebble_listen=127.0.0.1:$(ACME_PORT)) \
	$(if $(ACME_MANAGEMENT_PORT),-e dstack_acme_lab_pebble_management_listen=127.0.0.1:$(ACME_MANAGEMENT_PORT)) \
	$(if $(DNS_PORT),-e dstack_acme_lab_dns_listen=127.0.0.1:$(DNS_PORT))

## make demo: set up, then run the main job on the simulated default (see README); first waits
## for a make stop that is still stopping
demo: setup
	scripts/stop-demo.sh --wait $(DEMO_ROOT)
	ansible-playbook playbooks/demo.yml $(DEMO_VARS) $(ARGS)

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

## make fleet-demo: set up (also openssh-server), then the main job on a simulated fleet (as root):
## FLEET_HOSTS hosts (default 3: host1 the KMS and the gateway, the others VMMs), examples/hello
## with REPLICAS instances (default 2); make fleet-down removes the fleet
fleet-demo: setup-fleet
	REPLICAS=$(REPLICAS) scripts/fleet-demo.sh $(FLEET_HOSTS)

fleet-down:
	scripts/sim-fleet.sh down

setup-fleet:
	scripts/setup.sh --fleet

## make stop: stop what make demo started (the CVMs first: their containers go down with them),
## and return once all of it is down (or say what still runs after STOP_TIMEOUT seconds)
stop:
	STOP_TIMEOUT=$(STOP_TIMEOUT) scripts/stop-demo.sh $(DEMO_ROOT)

## make clean: remove .demo/ (stop first) and the network namespaces of its CVMs and gateway
clean:
	-for vm in $(DEMO_ROOT)/run/*/; do [ -d "$$vm" ] && ip netns del "dstack-$$(basename "$$vm")" 2>/dev/null; done; true
	-ip netns del dstack-gateway 2>/dev/null; true
	rm -rf $(DEMO_ROOT) build test-artifacts

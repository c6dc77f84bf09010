# Two commands: `make setup` on a fresh Debian machine, then `make test`.
VENV := .venv
PY := $(VENV)/bin/python
APT_PACKAGES := nftables python3-nftables python3-watchdog \
	python3-click python3-yaml python3-pytest python3-venv python3-setuptools \
	iproute2 nginx-light apache2-utils curl caddy procps util-linux \
	fail2ban python3-pyinotify openssh-server openssl \
	python3-hypothesis python3-prometheus-client python3-redis redis-server \
	python3-systemd systemd-journal-remote python3-flake8 \
	qemu-system-x86 busybox-static kmod \
	build-essential debhelper dh-python pybuild-plugin-pyproject dpkg-dev \
	lintian systemd man-db git

.PHONY: setup test lint unit netns deb package-test bench demo test-kernel
setup:
	apt-get update -q
	DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $(APT_PACKAGES)
	/usr/bin/python3 -m venv --system-site-packages $(VENV)
	$(PY) -m pip install -q --no-build-isolation --no-deps -e . -e tests/lab

# Lint, unit and namespace tests, then the real install path of the Debian package.
test: lint
	$(PY) -m pytest -q -rs tests
	$(MAKE) package-test

# python3-flake8 (Debian's; ruff is not in bookworm), configured in .flake8.
lint:
	$(PY) -m flake8

unit:
	$(PY) -m pytest -q -m "not netns" tests

netns:
	$(PY) -m pytest -q -rs -m netns tests

# The kernel-contract suite (tests/kernel) inside Debian 12's own kernel (6.1),
# booted in qemu: fetches linux-image-6.1.0-*-amd64 once into build/kernel.
# Needs root; about 10 minutes under software emulation (TCG).
test-kernel:
	tests/kernel/lane.sh

# The .deb, .changes and .buildinfo go to build/deb; the build runs on a copy
# of the tree in /tmp, so it leaves nothing behind in the repository.
deb:
	tests/package/build_deb.sh build/deb

# Needs root: installs the .deb with apt, applies the shipped policy inside
# network namespaces it makes, then purges the package again.
package-test: deb
	tests/package/test_install.sh build/deb

# policyd beside Debian's fail2ban (needs root; namespaces only): prints the
# table, writes bench/results/latest.md and bench/RESULTS.md. About 10 minutes.
bench:
	$(PY) bench/run.py

# A narrated tour in throwaway namespaces: nginx, a trusted client, an attacker
# who gets banned, and a trial that undoes itself. Needs root.
demo:
	$(PY) demo/demo.py

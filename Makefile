# dsfleet — every entry a person or CI types. `make demo` and `make test` are the README's two commands.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
CUDA_ARCH ?=
STAMP := $(VENV)/.dsfleet-installed
IMAGE ?= dsfleet
BASE_IMAGE ?=

.PHONY: setup sysdeps venv demo test render lint image image-cpu slurm-up slurm-down bench clean

# System packages the tests use for real (Slurm, sshd, pdsh, OpenMPI, shellcheck, libaio). Root + apt only.
sysdeps:
	bash scripts/install-system-deps.sh

# The bare-metal install: the same script the Docker image RUNs (docker/install.sh).
# CUDA_ARCH empty = CPU ops (CPU Adam, AIO, shm collective); 8.9, "8.0;9.0", 9.0+PTX = GPU ops for those archs.
$(STAMP): pyproject.toml docker/install.sh docker/common.sh docker/check-ops.sh
	test -x $(PY) || python3 -m venv $(VENV_FLAGS) $(VENV)
	PYTHON=$(PY) CUDA_ARCH="$(CUDA_ARCH)" DSFLEET_SRC=. bash docker/install.sh
	touch $(STAMP)

# `make venv CUDA_ARCH=9.0 [VENV_FLAGS=--system-site-packages]` always runs the install (seconds when the ops are
# already built for that arch; a stamp cannot tell arches apart). The flag lets a venv see a preinstalled torch.
venv:
	rm -f $(STAMP)
	$(MAKE) --no-print-directory $(STAMP)

setup: sysdeps $(STAMP)

demo: setup
	bash scripts/demo.sh

test: setup
	$(PY) -m pytest -q -rs tests

render: $(STAMP)
	$(VENV)/bin/dsfleet render --all

lint: setup
	shellcheck docker/*.sh scripts/*.sh slurm/*.sbatch
	$(VENV)/bin/hadolint docker/Dockerfile*

# Tags IMAGE:sm89-torchT-dsD and IMAGE:sm89 (image-cpu: IMAGE:cpu-...); docker, podman or buildah, see docs/image.md.
image:
	bash docker/build-image.sh "$(CUDA_ARCH)" "$(IMAGE)" "$(BASE_IMAGE)"

image-cpu:
	bash docker/build-image.sh cpu "$(IMAGE)" "$(BASE_IMAGE)"

slurm-up: setup
	$(PY) -m tests.slurm_cluster up

slurm-down:
	$(PY) -m tests.slurm_cluster down

bench:
	bash scripts/bench.sh

clean:
	rm -rf runs build dist src/*.egg-info

# rgbt_seg_ros: one-command setup, tests and demo.
#   make test   create .venv if missing, install pinned dependencies and the package, run ruff + pytest
#   make demo   same setup, then the demo on the built-in synthetic sample data
# Re-running is fast: dependency and package installs are redone only when their inputs change.

SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
VENV_ABS := $(abspath $(VENV))
BIN := $(VENV_ABS)/bin
DEMO_OUT ?= demo_out
PYTEST_ARGS ?=

# Every command that runs ROS needs these (DESIGN.md: ament index in the venv, Fast DDS large-data transport).
export AMENT_PREFIX_PATH := $(VENV_ABS)$(if $(AMENT_PREFIX_PATH),:$(AMENT_PREFIX_PATH))
export FASTDDS_BUILTIN_TRANSPORTS := LARGE_DATA
export HF_HUB_OFFLINE := 1
export PYTHONDONTWRITEBYTECODE := 1

# A sourced system ROS 2 (robot): reuse its rclpy and messages instead of the PyPI wheels.
SYSTEM_ROS := $(shell [ -n "$$ROS_DISTRO" ] && $(PYTHON) -c "import rclpy" >/dev/null 2>&1 && echo 1)

PACKAGE_SOURCES := $(shell find rgbt_seg_ros launch config models resource -type f 2>/dev/null | grep -v __pycache__) \
	setup.py setup.cfg package.xml README.md LICENSE

.PHONY: test demo venv install lint clean help

help:
	@echo "make test   set up .venv and run ruff + the test suite"
	@echo "make demo   set up .venv and run the demo on the built-in sample data (writes $(DEMO_OUT)/)"

$(BIN)/python:
	$(PYTHON) -m venv $(if $(SYSTEM_ROS),--system-site-packages) $(VENV)

$(VENV)/.deps-stamp: $(BIN)/python requirements.txt requirements-ros.txt
	$(BIN)/pip install -qq --disable-pip-version-check "pip==26.3" "setuptools==79.0.1" wheel
	$(BIN)/pip install -qq --disable-pip-version-check torch==2.13.0
	$(BIN)/pip install -qq --disable-pip-version-check -r requirements.txt
	SAM2_BUILD_CUDA=0 $(BIN)/pip install -qq --disable-pip-version-check --no-deps --no-build-isolation sam2==1.1.0
ifeq ($(SYSTEM_ROS),1)
	@echo "system ROS 2 ($$ROS_DISTRO) is active: not installing the PyPI ROS wheels"
else
	$(BIN)/pip install -qq --disable-pip-version-check -r requirements-ros.txt
endif
	touch $@

$(VENV)/.install-stamp: $(VENV)/.deps-stamp $(PACKAGE_SOURCES)
	rm -rf build *.egg-info
	$(BIN)/pip install -qq --disable-pip-version-check --no-deps --no-build-isolation --force-reinstall .
	rm -rf build *.egg-info
	touch $@

venv: $(VENV)/.deps-stamp
install: $(VENV)/.install-stamp

lint: install
	$(BIN)/ruff check rgbt_seg_ros test launch

test: lint
	$(BIN)/python -m pytest $(PYTEST_ARGS)

demo: install
	$(BIN)/rgbt-seg demo --out $(DEMO_OUT)

clean:
	rm -rf build *.egg-info $(VENV)/.install-stamp

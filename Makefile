# rgbt_seg_ros: one-command setup, tests and demo.
#   make test   create .venv if missing, install pinned dependencies and the package, run ruff + pytest
#   make demo   same setup, then the demo on the built-in synthetic sample data
#   make ros2-tools  the real ROS 2 launch system and `ros2` CLI in .venv, built from ../shared/ros2 (make test
#               runs it; with a sourced ROS 2 its own tools are used; without either the launch tests skip)
#   make compat a second venv (.venv-compat) with the oldest supported dependency versions (numpy 1.26, ...)
#               and the unit tests there
#   make bench-results  re-measure the benchmark table of docs/benchmarks.md (docs/results/bench/*.json, then `rgbt-seg bench table`)
#   make gpu-wheels  wheels of every runtime dependency but torch (CPython 3.10-3.12), sam2 and this package
#               in gpu_wheels/, for scripts/gpu_check.sh on a GPU machine without network (docs/gpu_check.md)
# Re-running is fast: dependency and package installs are redone only when their inputs change.

SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
VENV_ABS := $(abspath $(VENV))
BIN := $(VENV_ABS)/bin
DEMO_OUT ?= demo_out
PYTEST_ARGS ?=
COMPAT_VENV ?= .venv-compat
COMPAT_ABS := $(abspath $(COMPAT_VENV))
COMPAT_BIN := $(COMPAT_ABS)/bin
PIP_FLAGS := -qq --disable-pip-version-check
GPU_WHEELS ?= gpu_wheels
GPU_PYTHONS ?= 3.10 3.11 3.12

# Every command that runs ROS needs these (README "Quick start": ament index in the venv, Fast DDS large-data transport).
export AMENT_PREFIX_PATH := $(VENV_ABS)$(if $(AMENT_PREFIX_PATH),:$(AMENT_PREFIX_PATH))
export FASTDDS_BUILTIN_TRANSPORTS := LARGE_DATA
export HF_HUB_OFFLINE := 1
export PYTHONDONTWRITEBYTECODE := 1

# A sourced system ROS 2 (robot): reuse its rclpy and messages instead of the PyPI wheels.
SYSTEM_ROS := $(shell [ -n "$$ROS_DISTRO" ] && $(PYTHON) -c "import rclpy" >/dev/null 2>&1 && echo 1)
# The exact versions (constraints.txt), or with a system ROS 2 the ranges of requirements.txt kept at numpy < 2.
CONSTRAINTS := $(if $(SYSTEM_ROS),constraints-ros.txt,constraints.txt)

PACKAGE_SOURCES := $(shell find rgbt_seg_ros launch config models resource -type f 2>/dev/null | grep -v __pycache__) $(wildcard docs/*.md) \
	setup.py setup.cfg package.xml README.md LICENSE

# The real ROS 2 launch and CLI tools for the launch tests: a sourced ROS 2's own, else built into the venv
# from ROS2_SRC (sources of launch, launch_ros, ros2cli, rcl_interfaces, rosidl_runtime_py) when it exists.
ROS2_SRC ?= ../shared/ros2
ROS2_TOOLS_STAMP := $(if $(SYSTEM_ROS),,$(if $(wildcard $(ROS2_SRC)/launch_ros),$(VENV)/.ros2-tools-stamp))

.PHONY: test demo venv install lint compat clean help gpu-wheels bench-results ros2-tools

help:
	@echo "make test   set up .venv and run ruff + the test suite"
	@echo "make demo   set up .venv and run the demo on the built-in sample data (writes $(DEMO_OUT)/)"
	@echo "make ros2-tools  the real ROS 2 launch system and ros2 CLI in .venv from $(ROS2_SRC) (make test does this)"
	@echo "make compat set up $(COMPAT_VENV) with the oldest supported versions and run the unit tests there"
	@echo "make gpu-wheels  fill $(GPU_WHEELS)/ with wheels for scripts/gpu_check.sh on an offline GPU machine (docs/gpu_check.md)"
	@echo "make bench-results  re-measure the benchmark table of docs/benchmarks.md (3 runs each into docs/results/bench/, ~30 min)"

# $(call install_deps,BIN,CONSTRAINTS): pip and setuptools, torch, the requirements and sam2 into one venv.
define install_deps
	$(1)/pip install $(PIP_FLAGS) "pip==26.3" "setuptools==79.0.1" wheel
	$(1)/pip install $(PIP_FLAGS) -c $(2) torch
	$(1)/pip install $(PIP_FLAGS) -c $(2) -r requirements.txt -r requirements-dev.txt
	SAM2_BUILD_CUDA=0 $(1)/pip install $(PIP_FLAGS) --no-deps --no-build-isolation sam2==1.1.0
endef

# $(call install_package,BIN): this package (not editable: data files go to share/), and its console
# scripts linked into lib/rgbt_seg_ros/, where `ros2 run` and `ros2 launch` look (as colcon installs them).
define install_package
	rm -rf build *.egg-info
	$(1)/pip install $(PIP_FLAGS) --no-deps --no-build-isolation --force-reinstall .
	rm -rf build *.egg-info
	$(1)/python scripts/ros_executables.py
endef

$(BIN)/python:
	$(PYTHON) -m venv $(if $(SYSTEM_ROS),--system-site-packages) $(VENV)

$(VENV)/.deps-stamp: $(BIN)/python requirements.txt requirements-dev.txt $(CONSTRAINTS) requirements-ros.txt
	$(call install_deps,$(BIN),$(CONSTRAINTS))
ifeq ($(SYSTEM_ROS),1)
	@echo "system ROS 2 ($$ROS_DISTRO) is active: not installing the PyPI ROS wheels"
else
	$(BIN)/pip install $(PIP_FLAGS) -r requirements-ros.txt
endif
	touch $@

$(VENV)/.install-stamp: $(VENV)/.deps-stamp $(PACKAGE_SOURCES) scripts/ros_executables.py
	$(call install_package,$(BIN))
	touch $@

venv: $(VENV)/.deps-stamp
install: $(VENV)/.install-stamp

# The stamp holds the seconds the build took; a second run costs nothing.
$(VENV)/.ros2-tools-stamp: $(VENV)/.deps-stamp scripts/ros2_tools.sh requirements-ros-tools.txt
	@start=$$(date +%s); bash scripts/ros2_tools.sh $(ROS2_SRC) $(VENV) && echo $$(( $$(date +%s) - start )) > $@

ros2-tools: install $(ROS2_TOOLS_STAMP)
ifeq ($(SYSTEM_ROS),1)
	@echo "ROS 2 tools: the sourced ROS 2 $$ROS_DISTRO's launch and ros2 CLI"
else ifneq ($(ROS2_TOOLS_STAMP),)
	@echo "ROS 2 tools: real launch / launch_ros / launch_pytest / ros2 CLI in $(VENV) (tool-chain build took $$(cat $(ROS2_TOOLS_STAMP)) s; cached)"
else
	@echo "ROS 2 tools: $(ROS2_SRC) not found and no ROS 2 sourced: the tests that need ros2 launch are skipped"
endif

lint: install
	$(BIN)/ruff check rgbt_seg_ros test launch

test: lint ros2-tools
	$(BIN)/python -m pytest $(PYTEST_ARGS)

demo: install
	$(BIN)/rgbt-seg demo --out $(DEMO_OUT)

# The same install with the oldest supported versions (constraints-compat.txt) in a second venv, then the
# unit tests there. No system site packages: the ROS 2 wheels install with numpy 1.26 and work with it.
$(COMPAT_BIN)/python:
	$(PYTHON) -m venv $(COMPAT_VENV)

$(COMPAT_VENV)/.deps-stamp: $(COMPAT_BIN)/python requirements.txt requirements-dev.txt constraints-compat.txt requirements-ros.txt
	$(call install_deps,$(COMPAT_BIN),constraints-compat.txt)
	$(COMPAT_BIN)/pip install $(PIP_FLAGS) -c constraints-compat.txt -r requirements-ros.txt
	touch $@

$(COMPAT_VENV)/.install-stamp: $(COMPAT_VENV)/.deps-stamp $(PACKAGE_SOURCES) scripts/ros_executables.py
	$(call install_package,$(COMPAT_BIN))
	touch $@

compat: $(COMPAT_VENV)/.install-stamp
	@$(COMPAT_BIN)/python -c "import sys, numpy, cv2, matplotlib, torch, peft; \
		print('compat:', sys.version.split()[0], 'numpy', numpy.__version__, 'opencv', cv2.__version__, \
		'matplotlib', matplotlib.__version__, 'torch', torch.__version__, 'peft', peft.__version__)"
	AMENT_PREFIX_PATH=$(COMPAT_ABS) $(COMPAT_BIN)/python -m pytest -m "not integration" -x -q $(PYTEST_ARGS)

# Wheels for an offline GPU machine that has its own torch (scripts/gpu_wheels.py says what and how):
# sam2 1.1.0 built here with SAM2_BUILD_CUDA=0 --no-deps --no-build-isolation (the venv's torch), this
# package, and every runtime dependency except torch and its CUDA libraries, at constraints.txt's versions
# where PyPI has a wheel for that Python. Made anew each time (from pip's cache: fast); MANIFEST.txt lists it.
gpu-wheels: $(VENV)/.deps-stamp
	@start=$$(date +%s); \
	$(BIN)/python scripts/gpu_wheels.py --clean --out $(GPU_WHEELS) --pythons $(GPU_PYTHONS) --constraints constraints.txt && \
	echo "make gpu-wheels: $$(du -sh $(GPU_WHEELS) | cut -f1) in $(GPU_WHEELS)/ after $$(( $$(date +%s) - start )) s"

# the benchmark table (docs/benchmarks.md): every command 3 times into docs/results/bench/, then `rgbt-seg bench table`.
bench-results: install
	bash scripts/measure_benchmarks.sh --runs 3

clean:
	rm -rf build *.egg-info $(VENV)/.install-stamp $(COMPAT_VENV)/.install-stamp

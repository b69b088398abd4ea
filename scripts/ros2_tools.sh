#!/usr/bin/env bash
# The real ROS 2 launch system and `ros2` command line in the project's venv, on a machine without a
# ROS 2 install (`make ros2-tools`; `make test` runs it when the sources are there).
#
#   bash scripts/ros2_tools.sh SRC VENV
#
# SRC holds unmodified source trees of launch (launch, launch_xml, launch_yaml, launch_testing,
# launch_pytest), launch_ros (launch_ros, ros2launch, launch_testing_ros), ros2cli (ros2cli and the
# verbs pkg, run, node, service, topic, param, lifecycle, interface), rcl_interfaces
# (composition_interfaces) and rosidl_runtime_py. VENV already has the project's dependencies and the
# kilted rclpy wheels (requirements-ros.txt). Afterwards `VENV/bin/ros2 launch rgbt_seg_ros
# segment.launch.py` and launch_pytest work with AMENT_PREFIX_PATH=VENV.
#
# What it takes (each step is needed, none is a workaround of this project's code):
#  * the Python packages install with pip, not on PYTHONPATH: `ros2` finds its verbs, and launch its
#    frontends, through their entry points. pip builds in the source tree, so they are copied first;
#  * launch_ros imports composition_interfaces, which has no wheel: it is generated and built with
#    CMake by rosidl from the kilted ament/rosidl wheels (requirements-ros-tools.txt). The message
#    wheels' CMake exports name the include directories of the machine that built them
#    (/opt/python/cp3X-cp3X/...); they are pointed at this interpreter's first.
# Prints how long it took; the Makefile keeps a stamp so that a second `make test` costs nothing.
set -euo pipefail

SRC=$(realpath "${1:?usage: ros2_tools.sh SRC VENV}")
VENV=$(realpath "${2:?usage: ros2_tools.sh SRC VENV}")
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="$VENV/bin/python"
PIP=("$PY" -m pip install -qq --disable-pip-version-check)
WORK="$VENV/ros2-tools"   # copies of the sources and the CMake build; removed with the venv
t0=$(date +%s)
say() { echo "[ros2-tools +$(($(date +%s) - t0)) s] $*"; }

for d in launch launch_ros ros2cli rcl_interfaces/composition_interfaces rosidl_runtime_py; do
  [ -d "$SRC/$d" ] || { echo "ros2_tools.sh: $SRC/$d is missing (expected the ROS 2 launch and CLI sources there)" >&2; exit 2; }
done

say "wheels: osrf-pycommon and the ament/rosidl CMake packages (requirements-ros-tools.txt)"
"${PIP[@]}" -c "$REPO/constraints.txt" -r "$REPO/requirements-ros-tools.txt"

PACKAGES=(
  launch/launch launch/launch_xml launch/launch_yaml launch/launch_testing launch/launch_pytest
  launch_ros/launch_ros launch_ros/ros2launch launch_ros/launch_testing_ros rosidl_runtime_py
  ros2cli/ros2cli ros2cli/ros2pkg ros2cli/ros2run ros2cli/ros2node ros2cli/ros2service ros2cli/ros2topic
  ros2cli/ros2param ros2cli/ros2lifecycle ros2cli/ros2interface
)
say "launch, launch_ros, launch_testing, launch_pytest, ros2cli and its verbs from $SRC"
rm -rf "$WORK" && mkdir -p "$WORK/py"
copies=()
for p in "${PACKAGES[@]}"; do
  mkdir -p "$WORK/py/$p" && cp -a "$SRC/$p/." "$WORK/py/$p/" && chmod -R u+w "$WORK/py/$p"
  copies+=("$WORK/py/$p")
done
# lark: launch's substitution grammar imports `lark`; the rosidl-parser wheel already brings lark-parser
# (the same module), so --no-deps keeps a second lark from overwriting it.
"${PIP[@]}" --no-deps --no-build-isolation "${copies[@]}" 2>&1 | grep -E '^(ERROR|error)' || true
"$PY" -c 'import launch, launch_pytest, ros2cli' 2>/dev/null \
  || { echo "ros2_tools.sh: the launch packages did not install into $VENV" >&2; exit 1; }

say "composition_interfaces with rosidl and CMake"
PYINC=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')
NPINC=$("$PY" -c 'import numpy; print(numpy.get_include())')
grep -rlE '/opt/python/cp3[0-9]+-cp3[0-9]+' "$VENV"/share/*/cmake 2>/dev/null | xargs -r sed -i -E \
  -e "s#/opt/python/cp3[0-9]+-cp3[0-9]+/include/python3\.[0-9]+#$PYINC#g" \
  -e "s#/opt/python/cp3[0-9]+-cp3[0-9]+/lib/python3\.[0-9]+/site-packages/numpy/(_core|core)/include#$NPINC#g"
export AMENT_PREFIX_PATH="$VENV" PATH="$VENV/bin:$PATH"
cmake -S "$SRC/rcl_interfaces/composition_interfaces" -B "$WORK/composition_interfaces" \
  -DCMAKE_INSTALL_PREFIX="$VENV" -DCMAKE_PREFIX_PATH="$VENV" -DPython3_EXECUTABLE="$PY" \
  -DBUILD_TESTING=OFF -DCMAKE_BUILD_TYPE=Release > "$WORK/cmake_configure.log" 2>&1 \
  || { tail -30 "$WORK/cmake_configure.log" >&2; echo "ros2_tools.sh: configuring composition_interfaces failed (log: $WORK/cmake_configure.log)" >&2; exit 1; }
cmake --build "$WORK/composition_interfaces" -j"$(nproc)" > "$WORK/cmake_build.log" 2>&1 \
  || { tail -30 "$WORK/cmake_build.log" >&2; echo "ros2_tools.sh: building composition_interfaces failed (log: $WORK/cmake_build.log)" >&2; exit 1; }
cmake --install "$WORK/composition_interfaces" > "$WORK/cmake_install.log" 2>&1
rm -rf "$WORK/composition_interfaces"

say "check: launch_ros imports, ros2 knows its verbs"
"$PY" -c 'from composition_interfaces.srv import LoadNode; import launch_ros.actions, launch_testing_ros'
verbs=$("$VENV/bin/ros2" --help 2>&1)
for verb in launch run pkg node param lifecycle topic service; do
  grep -qE "^  $verb " <<< "$verbs" || { echo "ros2_tools.sh: 'ros2 $verb' is missing" >&2; exit 1; }
done
say "done: the real ROS 2 launch and CLI tools are in $VENV"

"""ament_python package setup: the Python package, console scripts and the share/ data files."""

from glob import glob

from setuptools import find_packages, setup

PACKAGE = "rgbt_seg_ros"


def files(pattern: str) -> list[str]:
    return sorted(p for p in glob(pattern) if not p.endswith("~"))


setup(
    name=PACKAGE,
    version="0.1.0",
    packages=find_packages(exclude=["test", "test.*"]),
    data_files=[
        ("share/ament_index/resource_index/packages", [f"resource/{PACKAGE}"]),
        (f"share/{PACKAGE}", ["package.xml", "README.md", "LICENSE"]),
        (f"share/{PACKAGE}/docs", files("docs/*.md")),  # README's links, also in an installed copy
        (f"share/{PACKAGE}/launch", files("launch/*.launch.py")),
        (f"share/{PACKAGE}/config", files("config/*.yaml") + files("config/*.rviz") + files("config/*.xml")),
        (f"share/{PACKAGE}/config/datasets", files("config/datasets/*.yaml")),
        (f"share/{PACKAGE}/config/registration", files("config/registration/*.yaml")),
        (f"share/{PACKAGE}/models", files("models/*.yaml") + files("models/*.md")),
        (f"share/{PACKAGE}/models/demo", files("models/demo/*")),
    ],
    install_requires=["setuptools"],
    zip_safe=False,
    maintainer="rgbt_seg_ros maintainers",
    maintainer_email="maintainers@rgbt-seg-ros.dev",
    description="RGB-thermal semantic segmentation for ROS 2 (SAM2-based SARTM, CPAL, FusionSAM backends)",
    license="Apache-2.0",
    # Runtime Python dependencies are in requirements.txt and package.xml, not install_requires: console
    # scripts must start with whatever numpy/opencv a robot's ROS 2 python has (see requirements.txt).
    extras_require={
        "export": ["onnx>=1.15", "onnxruntime>=1.17"],  # rgbt-seg export-onnx
        "tensorboard": ["tensorboard>=2.14"],  # training scalars (metrics.jsonl is always written)
    },
    entry_points={
        "console_scripts": [
            f"segment_node = {PACKAGE}.ros.node:main",
            f"rgbt-seg = {PACKAGE}.cli:main",
        ],
    },
)

"""The package layout; everything else is in pyproject.toml.

The recipe book `configs/` is installed as the package `rlhf.recipes` (its YAMLs as package data), so `rlhf
recipes` and `rlhf init` find the recipes in an installed wheel while a checkout keeps typing `configs/tiny/...`.
Mapping a package onto another folder next to a package discovery is what pyproject.toml alone cannot say.
"""

from setuptools import find_packages, setup

setup(
    packages=[*find_packages(include=["rlhf*"]), "rlhf.recipes"],
    package_dir={"rlhf.recipes": "configs"},
    package_data={"rlhf.recipes": ["*/*.yaml"]},
    include_package_data=False,  # the YAMLs above are the only data files
)

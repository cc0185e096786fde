"""The distribution's packages: `t5xlike/`, and the repository's `tasks/` and `gin_configs/`
shipped inside it (the rest of the metadata is in pyproject.toml).

The repository keeps `tasks/` and `gin_configs/` at its top, where users look for them; an
install puts them under the package, as the importable `t5xlike.tasks` and the data
directory `t5xlike/gin_configs/` (which `t5xlike/cli/gin_config.py` searches), so it adds no
top-level name but `t5xlike`. pyproject.toml cannot say this: setuptools' package discovery
does not map directories, so the lists are computed here, and a new module, task package or
gin directory ships without a change to this file (`tests/test_wheel_install.py` checks the
wheel against the source tree).
"""
import setuptools

TASK_PACKAGES = ["t5xlike.tasks"] + [
    f"t5xlike.tasks.{name}" for name in setuptools.find_packages(where="tasks")]
# The gin directories (and aot's GPU target files) hold no Python; listed as (namespace)
# packages because setuptools warns that it may stop shipping the data of a directory that
# is not.
GIN_PACKAGES = ["t5xlike.gin_configs"] + [
    f"t5xlike.gin_configs.{name}"
    for name in setuptools.find_namespace_packages(where="gin_configs")]

setuptools.setup(
    packages=setuptools.find_packages(include=["t5xlike", "t5xlike.*"]) + TASK_PACKAGES
    + GIN_PACKAGES + ["t5xlike.aot.gpu_targets"],
    package_dir={"t5xlike.tasks": "tasks", "t5xlike.gin_configs": "gin_configs"},
    package_data={"t5xlike.tasks.embedded": ["*.gz", "*.model", "LICENSE"],
                  "t5xlike.aot.gpu_targets": ["*.txtpb"],
                  **{name: ["*.gin"] for name in GIN_PACKAGES}},
)

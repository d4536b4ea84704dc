"""The one compiled part: the fast lane's C (src/portsentry/sensors/lane.c), loaded with ctypes.

Everything else is in pyproject.toml. The extension is optional: where no C compiler is found
the package installs without it and the daemon runs every probe through Python (status says so).
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension(
    "portsentry.sensors._lane", ["src/portsentry/sensors/lane.c"],
    extra_compile_args=["-O2", "-std=gnu11", "-Wall", "-Wextra"], extra_link_args=["-pthread"],
    optional=True)])

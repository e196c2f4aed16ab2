"""Build of the optional C extension; all project metadata is in pyproject.toml."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        # The C version of collab.updates' scan; collab.updates falls back to Python without it.
        Extension("collab._fastscan", ["collab/_fastscan.c"], optional=True),
    ],
)

"""Builds the fast lane, piuptime.gateway._lane (C). Everything else is in pyproject.toml.

The extension is optional: without a C compiler the package installs and runs on its Python
path alone (``piuptime run`` says so at start). See docs/internals.md, "The fast lane".
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "piuptime.gateway._lane",
            sources=["src/piuptime/gateway/_lane.c"],
            extra_compile_args=["-O2", "-Wall", "-Wno-missing-field-initializers"],
            optional=True,
        )
    ]
)

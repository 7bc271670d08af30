import os
import sys

import pytest
from hypothesis import settings

sys.path.insert(0, os.path.dirname(__file__))

# The suite is deterministic by default (the same examples on every run, so a result can be
# reproduced); HYPOTHESIS_PROFILE=explore draws new examples each run.
settings.register_profile("deterministic", derandomize=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "deterministic"))


@pytest.fixture(scope="session")
def runs(tmp_path_factory):
    """runs(strategy, *arguments): the output directory of tests/training_run.py, run once per session."""
    from shared_runs import train

    root = tmp_path_factory.mktemp("runs")
    return lambda strategy, *extra: train(root, strategy, *extra)

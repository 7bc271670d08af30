import os
import sys

from hypothesis import settings

sys.path.insert(0, os.path.dirname(__file__))

# The suite is deterministic by default (the same examples on every run, so a result can be
# reproduced); HYPOTHESIS_PROFILE=explore draws new examples each run.
settings.register_profile("deterministic", derandomize=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "deterministic"))

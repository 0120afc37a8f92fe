"""Shared set-up of the Python package's tests.

Without torch (or transformers, or the installed package) the tests that
need it skip with a notice, unless FLATMERGE_REQUIRE_PYTHON=1 (CI), which
turns the skip into a failure.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

"""The test run must exercise the compiled extension, not only the pure-torch twins."""
import os

import pytest

import fastspec

ALLOW_NO_NATIVE = os.environ.get("FASTSPEC_ALLOW_NO_NATIVE") == "1"


@pytest.mark.skipif(ALLOW_NO_NATIVE and not fastspec.ops.native_available(),
                    reason="FASTSPEC_ALLOW_NO_NATIVE=1: this run tests only the pure-torch twins (fastspec._C not built)")
def test_native_extension_is_loaded():
    # FASTSPEC_ALLOW_NO_NATIVE=1 is for running the suite on a pure-Python checkout on purpose;
    # the skip then shows in the summary, and with the extension present the test still checks it.
    assert fastspec.ops.native_available(), (
        f"fastspec._C is not importable from {os.path.dirname(fastspec.__file__)}: run `pytest` (not "
        "`python -m pytest` from the repo root) after `pip install --no-build-isolation .`, or build in place"
    )

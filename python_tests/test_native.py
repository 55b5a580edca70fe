"""The test run must exercise the compiled extension, not only the pure-torch twins."""
import os

import fastspec


def test_native_extension_is_loaded():
    # Set FASTSPEC_ALLOW_NO_NATIVE=1 only to run the suite on a pure-Python checkout on purpose.
    if os.environ.get("FASTSPEC_ALLOW_NO_NATIVE") == "1":
        return
    assert fastspec.ops.native_available(), (
        f"fastspec._C is not importable from {os.path.dirname(fastspec.__file__)}: run `pytest` (not "
        "`python -m pytest` from the repo root) after `pip install --no-build-isolation .`, or build in place"
    )

"""The test run must exercise the compiled extension, not only the pure-torch twins."""
import os

import pytest
import torch

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


@pytest.mark.skipif(not fastspec.ops.native_available(), reason="fastspec._C not built")
@pytest.mark.skipif(not torch._C.has_openmp, reason="this torch has no OpenMP intra-op backend")
def test_native_ops_run_on_every_intra_op_thread():
    # at::parallel_for is a header template: built without -fopenmp its pragma is dropped and every
    # native op (the target's linears above all) ran on one thread while torch's own ops used two.
    from fastspec import _C

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert _C.parallel_threads_seen(64) == 2
        torch.set_num_threads(1)
        assert _C.parallel_threads_seen(64) == 1
    finally:
        torch.set_num_threads(before)
    with pytest.raises(ValueError, match="n must be >= 1"):
        _C.parallel_threads_seen(0)

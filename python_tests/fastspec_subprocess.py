"""Run the CLI in a subprocess against the SAME fastspec the tests imported.

In CI that is the installed package (with fastspec._C); during development it is the source
tree built in place. Running from the repo root with `python -m` would silently pick the
source tree instead, which has no compiled extension after a plain `pip install .`.
"""
import os

import fastspec

PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(fastspec.__file__)))


def subprocess_env(**extra):
    env = dict(os.environ, **extra)
    env["PYTHONPATH"] = PACKAGE_ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")
    return env

"""fastspec: lossless speculative decoding for HF seq2seq (FLAN-T5) and causal targets."""
__version__ = "0.1.0"

from fastspec import ops  # noqa: F401  (loads the native extension when present)
from fastspec.errors import UserError  # noqa: F401  (the one user-error type: the CLI prints it as one line)


def __getattr__(name):
    # Lazy so `import fastspec` stays cheap and partial checkouts still import.
    if name in ("generate", "GenerateOutput"):
        from fastspec import engine

        return getattr(engine, name)
    if name == "load_target":
        from fastspec.targets import load_target

        return load_target
    if name == "NgramTable":
        from fastspec.ngram import NgramTable

        return NgramTable
    if name in ("drafters", "targets", "engine", "ngram", "data", "distill", "eval", "demo", "report", "cli", "introspect",
                "metrics"):
        import importlib

        return importlib.import_module(f"fastspec.{name}")
    raise AttributeError(f"module 'fastspec' has no attribute {name!r}")

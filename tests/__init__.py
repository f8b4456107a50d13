"""aac-tokend tests (a package, so `python -m tests.bench` can import its helpers)."""

"""The book's benchmarks: ``python -m bench`` runs them all (``bench/run_all.py``); each module also runs alone."""

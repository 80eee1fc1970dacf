"""The torture harness (see :mod:`tests.torture.harness`); ``python -m tests.torture`` runs it."""

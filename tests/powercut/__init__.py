"""Real power cuts (see :mod:`tests.powercut.rig`, :mod:`tests.powercut.harness`); ``python -m tests.powercut`` is the long run."""

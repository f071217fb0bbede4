"""Flower ClientApp of FedPipe."""

import time

LOADED = time.time()
"""When Flower's loader reached this package: after its own start-up, its pull of the message and its install of the
app (the first of a ClientApp process's start-up, ``phase::flower-s`` in a TRAIN reply)."""

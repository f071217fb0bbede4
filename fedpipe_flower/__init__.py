"""What both Flower apps share: the protocol of :mod:`fedpipe_core.protocol` as Flower messages."""

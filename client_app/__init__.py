"""Flower ClientApp of FedPipe."""

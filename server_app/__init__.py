"""Flower ServerApp of FedPipe."""

"""Backends: adapters that run the model's blocks under a skip mask and measure latencies."""

"""Offline preparation of SFT corpora into packed, loss-masked Arrow shards."""

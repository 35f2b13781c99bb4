"""Decoding strategies."""

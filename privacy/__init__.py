"""Differential-privacy accounting for tff-rec (see privacy/accounting.py)."""

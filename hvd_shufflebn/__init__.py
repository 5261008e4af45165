"""Shuffling BatchNorm across Horovod ranks."""

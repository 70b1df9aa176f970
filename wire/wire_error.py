"""The error every wire check raises; torch-free, so the streaming helpers (which the controller uses)
do not load torch."""


class WireError(ValueError):
    """A message that cannot be decoded; the text says what was wrong."""

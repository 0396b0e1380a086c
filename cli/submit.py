"""`gnr submit` (being written)."""


def submit() -> None:
    """(being written)"""

"""`gnr evaluate` (being written)."""


def evaluate() -> None:
    """(being written)"""

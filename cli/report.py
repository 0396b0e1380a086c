"""`gnr report` (being written)."""


def report() -> None:
    """(being written)"""

"""The one error type of the mask language."""


class MaskError(ValueError):
    """Bad mask input: names the offending slice or argument and the rule it broke."""

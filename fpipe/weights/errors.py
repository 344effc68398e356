"""The one error type of weight loading: a ValueError whose message says what to change."""


class WeightsError(ValueError):
    """A weights file that cannot be read, or that does not fit the model as configured."""

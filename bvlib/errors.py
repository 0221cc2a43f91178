"""The one exception type users see."""


class BVLibError(Exception):
    """A user error with a one-line message that says what to do."""

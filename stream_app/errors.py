"""Errors a user can fix; the CLI prints them as one line, without a traceback."""


class UserError(Exception):
    """A mistake or missing prerequisite the user can act on (bad flag, no Java, broker down)."""

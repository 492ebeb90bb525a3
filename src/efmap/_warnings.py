"""The warning category efmap emits."""


class EfmapWarning(UserWarning):
    """Warning about input or results that are valid but probably not what the caller meant."""

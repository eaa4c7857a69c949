"""User-facing errors. Each carries one clear message; the CLI prints it without a traceback."""


class MecheditError(Exception):
    """Base class: something the user asked for cannot be done, and the message says why and what to do."""


class ModelLoadError(MecheditError):
    """A model could not be found or loaded."""


class SiteError(MecheditError):
    """A site name is malformed or does not exist in the loaded model."""


class DataFormatError(MecheditError):
    """A data file or record is malformed; the message names the record and the field."""


class InputError(MecheditError):
    """A prompt, subject or target is unusable (empty, subject not in the prompt, too long, ...)."""

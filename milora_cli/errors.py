"""Errors a user can cause. The CLI prints str(error) as one line and exits with code 2."""


def first_line(error: BaseException) -> str:
    """The first line of a library's error message (or its type when it says nothing), for one line of ours."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


class MiloraError(Exception):
    """A user mistake: the CLI prints str(e) as one line and exits 2."""


class RecipeError(MiloraError):
    """The recipe (YAML or a command-line override) is invalid."""


class DataError(MiloraError):
    """A data file or dataset cannot be read or has the wrong layout."""


class ModelError(MiloraError):
    """The model cannot be loaded or does not have the layers the recipe targets."""


class ExportError(MiloraError):
    """An adapter cannot be merged or exported as asked (base mismatch, output in the way, bad size)."""


class InspectError(MiloraError):
    """`milora svd-inspect` was asked for something the model or run does not have, or a bad option."""


class EvalError(MiloraError):
    """A benchmark cannot be run as asked (unknown task, missing data, an output folder of other settings)."""


class QuantizeError(MiloraError):
    """`model.quantize` cannot run here: bitsandbytes missing, or a combination it does not support."""


class HubError(MiloraError):
    """A hub model or dataset id that is neither in the local cache nor fetchable from the hub."""


class AdapterError(MiloraError):
    """An adapter or checkpoint folder is missing a file, is damaged, or does not match its adapter_meta.json."""


class OutputError(MiloraError):
    """An output path cannot be written, or holds something the command did not create (see --force)."""

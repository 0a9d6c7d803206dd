"""evomerge: evolutionary black-box search for model-merging recipes."""
from evomerge.records import Candidate, Evaluation, Objective, UserError
from evomerge.recipe import ModelRef, PathStep, Recipe

__version__ = "0.1.0"
__all__ = ["Candidate", "Evaluation", "ModelRef", "Objective", "PathStep", "Recipe", "UserError", "__version__",
           "open_run"]


def __getattr__(name: str):
    if name == "open_run":  # lazy: keeps `import evomerge` (and `evomerge --help`) free of numpy/pandas
        from evomerge.results.journal import open_run

        return open_run
    raise AttributeError(f"module 'evomerge' has no attribute {name!r}")

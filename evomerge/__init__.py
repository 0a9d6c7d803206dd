"""evomerge: evolutionary black-box search for model-merging recipes."""
from evomerge.records import Candidate, Evaluation, Objective, UserError
from evomerge.recipe import ModelRef, PathStep, Recipe

__version__ = "0.1.0"
__all__ = ["Candidate", "Evaluation", "ModelRef", "Objective", "PathStep", "Recipe", "UserError", "__version__"]

"""The merge engine: model sources, merge methods, the resident materializer, checkpoint writing."""
from evomerge.merge.materializer import Materializer
from evomerge.merge.methods import names as method_names

__all__ = ["Materializer", "method_names"]

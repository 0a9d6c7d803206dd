"""The merge engine: model sources, merge methods, the resident materializer, checkpoint writing."""
from evomerge.merge import consensus, selective, spherical  # noqa: F401  (register their methods)
from evomerge.merge.materializer import Materializer
from evomerge.merge.mergekit_yaml import read_config, to_mergekit
from evomerge.merge.methods import names as method_names
from evomerge.merge.writer import write_checkpoint

__all__ = ["Materializer", "method_names", "read_config", "to_mergekit", "write_checkpoint"]

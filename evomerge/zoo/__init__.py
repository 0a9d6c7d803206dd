"""The zoo: tiny Llama models built here, so evomerge runs and is tested with no model hub."""

"""The read side of a run's journal: journal (`Run`, the one read API over the store), holdout and
comparisons (the held-out table and the fair searches beside it), figures, report and explorer (plots, the HTML
report, the notebook explorer), trackers (mirroring to W&B/MLflow/TensorBoard) and export (a candidate as an HF
checkpoint or mergekit YAML)."""

"""The Ray-side pipeline: the workflow DAG (`workflow`, its steps in `steps`, the engine in `dag`), training
recipes (`recipes`), data (`data/`), training (`training/`), evaluation (`evaluation/`), the registry gate
(`registry`), and the one module that talks to MLflow (`tracking`)."""

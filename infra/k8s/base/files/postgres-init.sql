-- Run once by the postgres image on an empty data directory: MLflow's basic-auth app keeps its users and
-- permissions in a database of their own (its own alembic migrations), beside the tracking store `mlflow`.
CREATE DATABASE mlflow_auth OWNER mlflow;

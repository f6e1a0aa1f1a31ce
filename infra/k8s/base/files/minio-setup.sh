#!/bin/bash
# Idempotent MinIO set-up, run by the Job `mlflow-minio-setup` with MinIO's root credentials (the only
# pod besides MinIO itself that has them): the artifact bucket, a policy limited to that bucket, and the
# user MLflow's server signs in as (its keys: Secret `mlflow-s3`), with that policy attached.
set -euo pipefail
for attempt in $(seq 1 60); do
  mc alias set local http://mlflow-minio:9000 "$MINIO_ROOT_USER" "$MINIO_ROOT_PASSWORD" >/dev/null && break
  echo "waiting for MinIO ($attempt)"; sleep 5
done
mc mb --ignore-existing local/mlflow-artifacts
mc admin policy create local mlflow-artifacts /config/minio-policy.json
mc admin user add local "$MLFLOW_S3_ACCESS_KEY" "$MLFLOW_S3_SECRET_KEY"
if ! mc admin user info local "$MLFLOW_S3_ACCESS_KEY" | grep -q 'mlflow-artifacts'; then
  mc admin policy attach local mlflow-artifacts --user "$MLFLOW_S3_ACCESS_KEY"
fi
echo "bucket mlflow-artifacts and user $MLFLOW_S3_ACCESS_KEY (policy mlflow-artifacts) ready"

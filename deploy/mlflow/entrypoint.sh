#!/bin/sh
# MLflow tracking server with basic auth; runs, models and users all in PostgreSQL, artifacts
# proxied by the server (clients never need credentials for the artifact store itself).
# Every secret comes from the environment (compose .env / Kubernetes Secrets); none is baked in.
set -eu
: "${POSTGRES_PASSWORD:?set POSTGRES_PASSWORD}"
: "${MLFLOW_AUTH_ADMIN_PASSWORD:?set MLFLOW_AUTH_ADMIN_PASSWORD (the first admin account)}"
: "${MLFLOW_FLASK_SERVER_SECRET_KEY:?set MLFLOW_FLASK_SERVER_SECRET_KEY (signs sessions and CSRF tokens)}"
: "${MLFLOW_ALLOWED_HOSTS:?set MLFLOW_ALLOWED_HOSTS (the Host names clients use, e.g. mlflow:5000)}"
# +psycopg2: the driver this image installs (SQLAlchemy 2.1 reads bare postgresql:// as psycopg 3)
DB="postgresql+psycopg2://${POSTGRES_USER:-mlflow}:${POSTGRES_PASSWORD}@${POSTGRES_HOST:-postgres}:5432/${POSTGRES_DB:-mlflow}"

# The auth app reads its settings from a file: written at start, readable by this user only.
umask 077
cat > /tmp/basic_auth.ini <<INI
[mlflow]
default_permission = NO_PERMISSIONS
database_uri = ${DB}
admin_username = ${MLFLOW_AUTH_ADMIN_USERNAME:-admin}
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
INI
export MLFLOW_AUTH_CONFIG_PATH=/tmp/basic_auth.ini

exec mlflow server \
  --app-name basic-auth \
  --backend-store-uri "${DB}" \
  --artifacts-destination "${MLFLOW_ARTIFACTS_DESTINATION:-/mlartifacts}" \
  --host 0.0.0.0 --port 5000 \
  --allowed-hosts "${MLFLOW_ALLOWED_HOSTS}"

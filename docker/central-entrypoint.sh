#!/bin/sh
# docker/Dockerfile.central's entry point: `postgres`, `s3` or `mlflow` (docker/compose.central.yaml).
# Passwords come from files (compose secrets) or variables, never from the command line.
set -eu
role=${1:-mlflow}
read_secret() { # NAME: $NAME, else the file $NAME_FILE
  eval "v=\${$1:-}"; eval "f=\${$1_FILE:-}"
  if [ -z "$v" ] && [ -n "$f" ]; then v=$(cat "$f"); fi
  [ -n "$v" ] || { echo "central-entrypoint: set $1 or $1_FILE" >&2; exit 2; }
  printf '%s' "$v"
}
case "$role" in
  postgres)
    PGDATA=${PGDATA:-/var/lib/har-pg/data}
    su_pw=$(read_secret POSTGRES_SUPERUSER_PASSWORD)
    ml_pw=$(read_secret POSTGRES_MLFLOW_PASSWORD)
    if [ ! -s "$PGDATA/PG_VERSION" ]; then
      pwfile=$(mktemp); printf '%s\n' "$su_pw" >"$pwfile"; chown postgres "$pwfile"
      runuser -u postgres -- initdb -D "$PGDATA" -U postgres -A scram-sha-256 --pwfile "$pwfile" -E UTF8 --locale C
      rm -f "$pwfile"
      echo "host all all 0.0.0.0/0 scram-sha-256" >>"$PGDATA/pg_hba.conf"
      runuser -u postgres -- pg_ctl -D "$PGDATA" -o "-c listen_addresses=127.0.0.1 -k /tmp" -w start
      PGPASSWORD=$su_pw psql -h 127.0.0.1 -U postgres -v ON_ERROR_STOP=1 -q \
        -v pw="$ml_pw" <<'SQL'
CREATE ROLE mlflow LOGIN PASSWORD :'pw';
CREATE DATABASE mlflow OWNER mlflow;
CREATE DATABASE mlflow_auth OWNER mlflow;
SQL
      runuser -u postgres -- pg_ctl -D "$PGDATA" -m fast -w stop
    fi
    exec runuser -u postgres -- postgres -D "$PGDATA" -c listen_addresses='*' -c max_connections=200 -k /tmp
    ;;
  s3)
    key=$(read_secret S3_ACCESS_KEY); secret=$(read_secret S3_SECRET_KEY)
    umask 077
    printf '{"identities":[{"name":"har-edge-admin","credentials":[{"accessKey":"%s","secretKey":"%s"}],"actions":["Admin","Read","Write","List","Tagging"]}]}' \
      "$key" "$secret" >/tmp/s3.json
    exec weed server -dir=/var/lib/har-s3 -ip=0.0.0.0 -filer -s3 -s3.port=8333 -s3.config=/tmp/s3.json \
      -s3.port.iceberg=0 -s3.port.lance=0 -master.volumeSizeLimitMB=1024 -volume.max=0
    ;;
  mlflow)
    export PGPASSWORD; PGPASSWORD=$(read_secret POSTGRES_MLFLOW_PASSWORD)
    export AWS_ACCESS_KEY_ID AWS_SECRET_ACCESS_KEY
    AWS_ACCESS_KEY_ID=$(read_secret S3_ACCESS_KEY); AWS_SECRET_ACCESS_KEY=$(read_secret S3_SECRET_KEY)
    export MLFLOW_AUTH_ADMIN_PASSWORD; MLFLOW_AUTH_ADMIN_PASSWORD=$(read_secret MLFLOW_ADMIN_PASSWORD)
    export MLFLOW_FLASK_SERVER_SECRET_KEY; MLFLOW_FLASK_SERVER_SECRET_KEY=$(read_secret MLFLOW_FLASK_SECRET)
    export MLFLOW_S3_ENDPOINT_URL=${MLFLOW_S3_ENDPOINT_URL:-http://s3:8333} MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false
    db="postgresql+psycopg://mlflow@${POSTGRES_HOST:-postgres}:5432"
    cat >/central/basic_auth.ini <<INI
[mlflow]
default_permission = NO_PERMISSIONS
database_uri = $db/mlflow_auth
admin_username = admin
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
auth_cache_ttl_seconds = ${MLFLOW_AUTH_CACHE_TTL:-300}
INI
    export MLFLOW_AUTH_CONFIG_PATH=/central/basic_auth.ini
    bucket=${S3_BUCKET:-har-edge}
    python3 - "$bucket" <<'PY'
import os, sys, time, boto3
s3 = boto3.client("s3", endpoint_url=os.environ["MLFLOW_S3_ENDPOINT_URL"], region_name="us-east-1")
for _ in range(60):
    try:
        if sys.argv[1] not in [b["Name"] for b in s3.list_buckets()["Buckets"]]:
            s3.create_bucket(Bucket=sys.argv[1])
        s3.put_bucket_versioning(Bucket=sys.argv[1], VersioningConfiguration={"Status": "Enabled"})
        break
    except Exception:
        time.sleep(2)
else:
    sys.exit("the S3 store did not answer in 120 s")
PY
    tls=""
    if [ -n "${MLFLOW_TLS_CERT:-}" ]; then tls="--ssl-certfile $MLFLOW_TLS_CERT --ssl-keyfile $MLFLOW_TLS_KEY"; fi
    # MLflow reports usage to its project by default; a study server talks only to its devices (docs/privacy.md)
    export MLFLOW_DISABLE_TELEMETRY="${MLFLOW_DISABLE_TELEMETRY:-true}"
    exec mlflow server --backend-store-uri "$db/mlflow" --artifacts-destination "s3://$bucket/mlflow-artifacts" \
      --serve-artifacts --host 0.0.0.0 --port 5000 --workers "${MLFLOW_WORKERS:-2}" --app-name basic-auth \
      ${tls:+--uvicorn-opts "$tls"}
    ;;
  *)
    exec "$@"
    ;;
esac

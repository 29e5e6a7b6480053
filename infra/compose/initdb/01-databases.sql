-- Run once by the postgres image on an empty data volume (/docker-entrypoint-initdb.d):
-- the two databases of infra/defaults.env. MLflow creates its tables on first start; ablate
-- creates its own (and the read-only role ablate_reader, see dashboards/README.md) on the
-- first `ablate submit` or `ablate db upgrade`, so nothing else is made here.
CREATE DATABASE ablate_mlflow;   -- ABLATE_MLFLOW_DB: the MLflow server's backend store
CREATE DATABASE ablate;          -- ABLATE_STORE_DB: the ablate results store

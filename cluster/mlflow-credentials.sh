#!/usr/bin/env bash
# MLflow's user and password for the tracking servers of cluster/gpu-cluster.yaml and cluster/rayjob.yaml
# (`mlflow server --app-name basic-auth`), kept out of the repository and of every manifest.
#
#   cluster/mlflow-credentials.sh [FILE]     default FILE: ~/.decrop/mlflow-auth.env
#
# Writes FILE (mode 600; a folder it creates: 700) with MLFLOW_TRACKING_USERNAME=decrop and a random MLFLOW_TRACKING_PASSWORD,
# unless it exists already (then it only makes it private again). MLflow's client reads these two variables
# and sends them as HTTP basic auth; the servers create their admin user from them. Prints how to use FILE.
set -euo pipefail

FILE=${1:-$HOME/.decrop/mlflow-auth.env}
case $FILE in -h|--help) sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;; esac

DIR=$(dirname "$FILE")
[[ -d $DIR ]] || (umask 077 && mkdir -p "$DIR")  # a folder made here is private; an existing one is left as is
if [[ -e $FILE ]]; then
    echo "mlflow-credentials.sh: $FILE exists; kept" >&2
else
    # umask 077: the file is private from its first byte. 24 random bytes as hex: no character that a shell,
    # an env file or a URL would need escaped.
    (umask 077 && printf 'MLFLOW_TRACKING_USERNAME=decrop\nMLFLOW_TRACKING_PASSWORD=%s\n' \
        "$(od -An -N24 -tx1 /dev/urandom | tr -d ' \n')" >"$FILE")
    echo "mlflow-credentials.sh: wrote $FILE" >&2
fi
chmod 600 "$FILE"
cat >&2 <<EOF
Use:
  Ray cluster launcher: gpu-cluster.yaml copies $FILE to every node (file_mounts)
  Kubernetes:           kubectl create secret generic decrop-mlflow-auth --from-env-file="$FILE" \\
                          --from-literal=MLFLOW_FLASK_SERVER_SECRET_KEY="\$(openssl rand -hex 32)"
  the report, the UI:   set -a; . "$FILE"; set +a   (then python analysis/report.py --mlflow-uri http://...)
EOF

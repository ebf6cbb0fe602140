# Sourced by the bench scripts: the interpreter, densekit's source on the path, and helpers.
# PY: $PYTHON, else the project's .venv, else python. Run from the repository root.
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
if [ -z "${PYTHON:-}" ] && [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; fi
PY="${PYTHON:-python}"
DK=("$PY" -m densekit)

# summary FILE KEY...: the values of KEYs in a JSON file, on one line
summary() { "$PY" -c 'import json,sys; s=json.load(open(sys.argv[1])); print(" ".join(str(s.get(k)) for k in sys.argv[2:]))' "$@"; }

# the machine line and the results file's slug (cpu, or the card's name)
env_line() { "$PY" -c 'from densekit.bench.env import environment; from densekit.bench.report import environment_line; print(environment_line(environment()))'; }
result_slug() { "$PY" -c 'from densekit.bench.env import environment, card_slug; import torch; print(card_slug(environment(), ["cuda"] if torch.cuda.is_available() else ["cpu"]))'; }

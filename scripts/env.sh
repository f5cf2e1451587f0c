# Sourced by scripts/test.sh and scripts/demo.sh: create or reuse .venv and install the package with
# its test extra when setup.py changed since the last install (a stamp file records its hash).
VENV="${RLAIF_VENV:-.venv}"
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
# shellcheck disable=SC1091
source "$VENV/bin/activate"
stamp="$VENV/.rlaif_install_stamp"
want="$(sha256sum setup.py | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  python -m pip install --quiet --upgrade pip
  python -m pip install --quiet -e ".[test]"
  echo "$want" > "$stamp"
fi

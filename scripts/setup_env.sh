#!/usr/bin/env bash
# Create or refresh the project's virtual environment, idempotently.
# A second run with unchanged requirements only re-checks the stamp and takes about a second.
# Usage: scripts/setup_env.sh [cpu|gpu]   (default: cpu; BPO_VENV overrides the venv path)
set -euo pipefail
cd "$(dirname "$0")/.."
flavour="${1:-${BPO_STACK:-cpu}}"
venv="${BPO_VENV:-.venv}"
req="requirements/${flavour}.txt"
lock="requirements/${flavour}.lock"   # exact versions of the whole stack, where measured (cpu)
[ -f "$req" ] || { echo "setup: no requirements file $req (use cpu or gpu)" >&2; exit 2; }
constraints=()
[ -f "$lock" ] && constraints=(-c "$lock")

stamp_of() { cat "$req" $( [ -f "$lock" ] && echo "$lock" ) pyproject.toml scripts/setup_env.sh scripts/patch_torchvision.py | sha256sum | cut -c1-16; }
want="$flavour-$(stamp_of)"
if [ -f "$venv/.bpo-stamp" ] && [ "$(cat "$venv/.bpo-stamp")" = "$want" ]; then
  exit 0
fi

start=$(date +%s)
echo "setup: building $venv from $req (first run takes a few minutes)"
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
# pip prints a warning per package for this machine's file:// mirrors; hide those, keep the rest.
pip_run() {
  local log rc=0
  log=$(mktemp)
  "$venv/bin/python" -m pip "$@" >"$log" 2>&1 || rc=$?
  grep -v -e "^WARNING: Location 'file:" "$log" || true
  rm -f "$log"
  if [ "$rc" -ne 0 ]; then echo "setup: pip $* failed (exit $rc)" >&2; exit "$rc"; fi
}
pip_run install -q --upgrade pip
pip_run install -q -r "$req" "${constraints[@]}"
pip_run install -q --no-deps -e .
if [ "$flavour" = cpu ]; then
  # PyPI's torchaudio/torchcodec are CUDA-linked and break imports beside +cpu torch;
  # torchvision stays (vLLM's LLaVA imports its pure-Python transforms) and is patched.
  "$venv/bin/python" -m pip uninstall -q -y torchaudio torchcodec >/dev/null 2>&1 || true
  "$venv/bin/python" scripts/patch_torchvision.py
fi
"$venv/bin/python" -m bpo_ray.envcheck
echo "$want" > "$venv/.bpo-stamp"
echo "setup: done in $(( $(date +%s) - start )) s; venv size $(du -sh "$venv" | cut -f1)"

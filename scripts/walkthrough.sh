#!/usr/bin/env bash
# The README's walkthrough, end to end, in ./walkthrough-output (sets up .venv on first use).
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
exec bash "$ROOT/examples/walkthrough.sh"

#!/usr/bin/env bash
# The walkthrough: an old SimpleModel checkpoint meets a changed class.
# Run it with `bash scripts/walkthrough.sh` (or directly inside the virtualenv).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
WORK="$ROOT/walkthrough-output"
rm -rf "$WORK"
mkdir -p "$WORK"
cp -r "$ROOT/examples" "$WORK/examples"
cd "$WORK"

if [ -t 1 ]; then BOLD=$'\033[1m'; PLAIN=$'\033[0m'; else BOLD=""; PLAIN=""; fi
show() {  # the command as a user would type it
    local out="" a
    for a in "$@"; do
        if [[ "$a" =~ ^[A-Za-z0-9_./:=@+-]+$ ]]; then out+="$a "; else out+="'$a' "; fi
    done
    printf '%s' "${out% }"
}
step() { printf '\n%s$ %s%s\n' "$BOLD" "$(show "$@")" "$PLAIN"; "$@"; }
say() { printf '\n# %s\n' "$*"; }

say "1. A model was trained and saved with the old class (fc1 10->20, fc2 20->5)."
step python -m examples.story save-v1 model.pth
cp model.pth original.pth

say "The class changed (fc2 is now 20->20, a new fc3 20->5): a strict load fails."
step python -m examples.story load model.pth || true

say "2. Version the model's state dict with ckptmigrate."
step ckptmigrate init migrations
step ckptmigrate revision -m "initial" --rev-id 1a0c3e5f7b2d
step ckptmigrate revision -m "add fc3" --rev-id 2b7f0c1d9e4a

say "Fill in the new revision: old fc2 becomes fc3, the new fc2 starts as the identity."
cp "$ROOT/migrations/versions/2b7f0c1d9e4a_add_fc3.py" migrations/versions/
step sed -n '/^def upgrade/,$p' migrations/versions/2b7f0c1d9e4a_add_fc3.py
step ckptmigrate history

say "3. The old file has no stamp: record that it is at 'initial', then upgrade it in place."
step ckptmigrate stamp model.pth 1a0c3e5f7b2d
step ckptmigrate upgrade model.pth --dry-run
step ckptmigrate upgrade model.pth
step ckptmigrate current model.pth
step python -m examples.story same-outputs model.pth original.pth

say "4. Downgrade gives back the original tensors, bit for bit."
step ckptmigrate downgrade model.pth 1a0c3e5f7b2d
step python -m examples.story identical model.pth original.pth

say "5. Schemas: record the lineage's base schema (from the old file), point the config at the model."
step ckptmigrate schema --record original.pth --from 1a0c3e5f7b2d
sed -i 's|^# model = .*|model = examples.simple_model:build_model|' alembic_style.ini
step grep '^model' alembic_style.ini
step ckptmigrate check
say "Unstamped files are now identified by their keys, shapes and dtypes:"
step ckptmigrate current original.pth
say "A claim the file contradicts is refused, naming the revision it does match:"
step ckptmigrate upgrade original.pth --from 2b7f0c1d9e4a -o wrong.pth || true
step ckptmigrate diff original.pth

say "6. The class changes again (a LayerNorm before fc3); CI's 'ckptmigrate check' catches it."
sed -i 's|^model = .*|model = examples.simple_model:build_model_v3|' alembic_style.ini
step ckptmigrate check || true
say "Autogenerate writes the migration; review it, then check passes."
step ckptmigrate revision --autogenerate -m "add norm" --rev-id 3c9d2e4f6a8b
step sed -n '/^def upgrade/,$p' migrations/versions/3c9d2e4f6a8b_add_norm.py
step ckptmigrate check
step ckptmigrate upgrade model.pth
step python -m examples.story load-v3 model.pth

say "7. Automatic upgrade on load: one decorator on the class."
step sed -n '/^@ckptmigrate/,$p' examples/versioned_model.py
say "An old, unstamped file: identified, upgraded on the fly, loaded strictly."
step python -m examples.story versioned-load original.pth
say "A newer file (at 3c9d2e4f6a8b): downgraded to the class's pinned revision."
step python -m examples.story versioned-load model.pth

printf '\nWalkthrough complete: files are in %s\n' "$WORK"

# Sourced by the bench drivers: which broker they run.
# BROKER_REV=<revision> exports that commit's broker/ into $OUT/src (with the
# compiled _core from the work tree, refused unless _core/ matches the revision)
# and puts it first on PYTHONPATH; otherwise whatever `import broker` finds.
# Sets broker_desc, a line for the report.
if [[ -n "${BROKER_REV:-}" ]]; then
    git diff --quiet "$BROKER_REV" -- _core \
        || { echo "_core/ differs from $BROKER_REV: build that revision's core first" >&2; exit 1; }
    mkdir -p "$OUT/src"
    git archive "$BROKER_REV" broker | tar -x -C "$OUT/src"
    cp broker/_core.*.so "$OUT/src/broker/"
    export PYTHONPATH="$OUT/src${PYTHONPATH:+:$PYTHONPATH}"
fi
broker_src=$(cd /tmp && python -c 'import broker, os; print(os.path.dirname(broker.__file__))')
if [[ -n "${BROKER_REV:-}" ]]; then
    broker_desc="$BROKER_REV = $(git rev-parse --short "$BROKER_REV") (from $broker_src)"
else
    broker_desc="work tree $broker_src, HEAD $(git rev-parse --short HEAD)$(git diff --quiet HEAD -- broker _core || echo ', broker/ or _core/ modified')"
fi

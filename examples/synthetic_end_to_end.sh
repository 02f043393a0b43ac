#!/usr/bin/env bash
# End to end on the synthetic world, honestly:
#
#   synth world -> build -> voice encoder -> supervised -> predict -> score
#   + the control: the same supervised recipe on shuffled voice/target pairs
#
# and the question the scores must answer: does the model beat the mean face on ER, with a 95 %
# paired bootstrap interval (over test identities) of ER(mean face) - ER(model) above zero, while
# the shuffled control does not?
#
# Usage (from the repository root, with the project installed and the BFM reachable through
# $V2M_BFM_DIR or the user cache):
#
#   examples/synthetic_end_to_end.sh                       # full size: the paper's 1,225 identities and recipe (GPU)
#   IDENTITIES=240 IMAGES=3 IMAGE_SIZE=96 ENC_ITERS=1500 SUP_ITERS=1500 SUP_LR=1e-3 BATCH=32 \
#     CHANNELS=64,32,32,32,32,8 MIN_FRAMES=100 MAX_FRAMES=300 DEVICE=cpu WORKERS=1 \
#     examples/synthetic_end_to_end.sh                     # CPU: ~8 min on 2 busy cores (3.5 of them the world)
#
# That CPU run (SEED=0; 60 test identities): supervised ER 0.0189 vs mean face 0.0241, improvement
# +0.0051 [+0.0013, +0.0090]; shuffled control ER 0.0244, improvement -0.0003 [-0.0006, +0.0000].
#
# Every size is an environment variable (defaults below). Outputs go to $OUT (default
# synthetic_e2e/): world/, build/, encoder.pt, supervised.pt, shuffled.pt, their .metrics.csv,
# predictions_*.h5, scores_*.json/.csv, comparison.json, timings.tsv. Re-running reuses the world
# and the build (delete $OUT to start over); the trainers resume finished checkpoints as no-ops.
#
# The world is the default v2m_data.synth world (voices tied to gender and face shape by the
# documented VoiceLink; men's faces 0.4 SD wider on average). The shuffled control uses
# --shuffle-mode iteration: a fresh permutation of the identity -> target pairing every iteration,
# so the voices carry no information about the targets (a single fixed permutation of few
# identities keeps a chance correlation, e.g. of gender, that a model can learn).
set -euo pipefail

OUT=${OUT:-synthetic_e2e}
SEED=${SEED:-0}                    # world, training and bootstrap seed
IDENTITIES=${IDENTITIES:-1225}     # made-up people (a quarter on the A-E test side)
IMAGES=${IMAGES:-5}                # photos per identity
VIDEOS=${VIDEOS:-2}                # videos per identity
UTTERANCES=${UTTERANCES:-3}        # utterances per video (>= 3 on the test side: the benchmark uses 3)
IMAGE_SIZE=${IMAGE_SIZE:-160}      # photo side, pixels
BUILD_WORKERS=${BUILD_WORKERS:-2}  # parallel shard workers of the build
DEVICE=${DEVICE:-auto}             # training/prediction device: auto, cpu, cuda
CHANNELS=${CHANNELS:-64,256,384,576,864,64}  # voice-encoder widths (the paper's)
BATCH=${BATCH:-128}
ENC_ITERS=${ENC_ITERS:-20000}      # voice-encoder (speaker classification) iterations
ENC_LR=${ENC_LR:-1e-3}
SUP_ITERS=${SUP_ITERS:-50000}      # supervised iterations (the paper: 50K at batch 128, Adam 2e-4)
SUP_LR=${SUP_LR:-2e-4}
MIN_FRAMES=${MIN_FRAMES:-300}      # training crops, 10 ms frames (the paper: 3-8 s)
MAX_FRAMES=${MAX_FRAMES:-800}
WORKERS=${WORKERS:-2}              # DataLoader workers
LOADER=${LOADER:-cpu}              # cpu: DataLoader; gpu: feature bank on the device
BOOTSTRAP=${BOOTSTRAP:-2000}       # bootstrap resamples of the intervals

mkdir -p "$OUT"
TIMES="$OUT/timings.tsv"
printf 'step\tseconds\n' > "$TIMES"
step() {  # step NAME COMMAND...: run, time, log
    local name=$1 t0 t1
    shift
    echo "== $name: $*" >&2
    t0=$(date +%s%N)
    "$@"
    t1=$(date +%s%N)
    printf '%s\t%d.%d\n' "$name" $(((t1 - t0) / 1000000000)) $(((t1 - t0) / 100000000 % 10)) >> "$TIMES"
}

TRAIN_COMMON=(--data "$OUT/build" --device "$DEVICE" --seed "$SEED" --batch-size "$BATCH" --channels "$CHANNELS"
              --min-frames "$MIN_FRAMES" --max-frames "$MAX_FRAMES" --workers "$WORKERS" --loader "$LOADER"
              --val-every 0 --resume)

# 1. the world (VoxCeleb1 + VGGFace layouts, .pts landmarks, truth.h5)
if [ ! -f "$OUT/world/truth.h5" ]; then
    step synth v2m-build-dataset synth --out "$OUT/world" --identities "$IDENTITIES" --seed "$SEED" \
        --images-per-identity "$IMAGES" --videos-per-identity "$VIDEOS" --utterances-per-video "$UTTERANCES" \
        --image-size "$IMAGE_SIZE" --overwrite
fi
# 2. the build (features, precomputed landmarks -> 3DMM fits, references); resumes
step build v2m-build-dataset --voxceleb "$OUT/world" --vggface "$OUT/world/vggface" --out "$OUT/build" \
    --detector precomputed --workers "$BUILD_WORKERS"
# 3. voice encoder: speaker classification over the training (F-Z) identities
step voice-encoder v2m-train voice-encoder "${TRAIN_COMMON[@]}" --out "$OUT/encoder.pt" \
    --iterations "$ENC_ITERS" --lr "$ENC_LR"
# 4. supervised voice -> 3DMM, from that encoder; and the control on shuffled pairs (same recipe)
step supervised v2m-train supervised "${TRAIN_COMMON[@]}" --out "$OUT/supervised.pt" --encoder "$OUT/encoder.pt" \
    --iterations "$SUP_ITERS" --lr "$SUP_LR" --target-fallback
step shuffled v2m-train supervised "${TRAIN_COMMON[@]}" --out "$OUT/shuffled.pt" --encoder "$OUT/encoder.pt" \
    --iterations "$SUP_ITERS" --lr "$SUP_LR" --target-fallback --shuffle-pairs --shuffle-mode iteration
# 5. predictions: the first three utterances of every reference identity, whole
for m in supervised shuffled; do
    step "predict-$m" v2m-predict --checkpoint "$OUT/$m.pt" --data "$OUT/build" --out "$OUT/predictions_$m.h5" \
        --device "$DEVICE"
done
# 6. scores (with the mean face beside them); the model against the control as a paired baseline
step score-supervised v2m-bench score "$OUT/predictions_supervised.h5" --references "$OUT/build/references.h5" \
    --baseline "$OUT/predictions_shuffled.h5" --bootstrap "$BOOTSTRAP" --seed "$SEED" \
    --json "$OUT/scores_supervised.json" --csv "$OUT/scores_supervised.csv"
step score-shuffled v2m-bench score "$OUT/predictions_shuffled.h5" --references "$OUT/build/references.h5" \
    --bootstrap "$BOOTSTRAP" --seed "$SEED" --json "$OUT/scores_shuffled.json" --csv "$OUT/scores_shuffled.csv"
# 7. the claim: paired bootstrap interval of ER(mean face) - ER(model) over the scored identities
step compare python - "$OUT" "$BOOTSTRAP" "$SEED" <<'EOF'
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from v2m_bench import load_bfm, metrics
from v2m_bench.formats import read_references
from v2m_bench.stats import bootstrap_ci, paired_bootstrap

out, n_boot, seed = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
bfm = load_bfm()
refs = read_references(out / "build" / "references.h5")
row = {n: i for i, n in enumerate(np.asarray(refs.identity).astype(str))}
result = {}
for name in ("supervised", "shuffled"):
    table = pd.read_csv(out / f"scores_{name}.csv", index_col="identity")
    names = table.index.astype(str).tolist()
    ref_v = refs.to_vertices(bfm, np.array([row[n] for n in names]))
    mean_face = metrics.are(np.broadcast_to(bfm.mean, ref_v.shape), ref_v)["ER"].astype(np.float64)
    model = table["ER"].to_numpy(np.float64)
    d, lo, hi = bootstrap_ci(mean_face - model, n_boot=n_boot, seed=seed)
    _, p = paired_bootstrap(mean_face, model, n_boot=n_boot, seed=seed)
    result[name] = {"n_identities": len(names), "ER": float(model.mean()), "ER_meanface": float(mean_face.mean()),
                    "improvement": float(d), "ci_low": float(lo), "ci_high": float(hi), "p_value": float(p),
                    "beats_mean_face": bool(lo > 0)}
    print(f"{name:>10}: ER {model.mean():.4f} vs mean face {mean_face.mean():.4f} over {len(names)} identities; "
          f"ER(mean face) - ER(model) = {d:+.4f}, 95% paired bootstrap CI [{lo:+.4f}, {hi:+.4f}], p = {p:.3g} -> "
          + ("beats the mean face" if lo > 0 else "does not beat the mean face"))
(out / "comparison.json").write_text(json.dumps(result, indent=2) + "\n")
EOF

echo "== timings (s)" >&2
column -t "$TIMES" >&2

# Issue 13 exploration (2026-11-29), kept as run: probes on the features of truth_features.py, trained
# on train questions 100-407, compared with the shipped head on questions 0-99. Not a tested tool.
import json, sys, numpy as np, torch
from collections import defaultdict
sys.path.insert(0, '/work/main'); sys.path.insert(0, '/work/main/scripts')
from train_truth_head import fit_head, Config, auc
from safetensors.torch import load_file
F = np.load('/tmp/exp/feats.npy').astype(np.float32)
J = json.load(open('/tmp/exp/feats.json')); meta = J['meta']
qi = np.array([m['qi'] for m in meta]); y = np.array([m['y'] for m in meta]); src = [m['src'] for m in meta]
csvm = np.array([s == 'csv' for s in src]); gen = ~csvm
w_old = load_file('/work/main/mahalo/assets/smollm2_135m_truth_head.safetensors')['score.weight'][0].numpy()
HOLD = 100
def pairs_of(idx):
    by = defaultdict(lambda: ([], []))
    for i in idx: by[qi[i]][0 if y[i] else 1].append(i)
    return [(g, b, 'csv') for gs, bs in by.values() for g in gs for b in bs]
tr = np.where(csvm & (qi >= HOLD))[0]; te = np.where(csvm & (qi < HOLD))[0]; ge = np.where(gen & (qi < HOLD))[0]
def agree(scores, idx):
    by = defaultdict(list)
    for i in idx: by[(qi[i], src[i])].append(i)
    by2 = defaultdict(list)
    for i in idx: by2[qi[i]].append(i)
    a = t = 0
    for v in by2.values():
        for x in range(len(v)):
            for z in range(x + 1, len(v)):
                i, j = v[x], v[z]
                if y[i] != y[j]: t += 1; a += (scores[i] > scores[j]) == (y[i] > y[j])
    return a / t, t
def report(name, s):
    print(f"{name:28s} csv-heldout AUC {auc(s[te], y[te]):.3f}  gen AUC {auc(s[ge], y[ge]):.3f}  gen within-q agree {agree(s, ge)[0]:.3f} ({agree(s, ge)[1]})")
L = F.shape[1]
print('old head on last layer: check scale', (F[:5, -1] @ w_old))
report('old head (final)', F[:, -1] @ w_old)
def probe(X, alpha, bt, name):
    keys = tr; w, b = fit_head(X, keys, y[keys], [(g, b_, s) for g, b_, s in pairs_of(tr)], Config(alpha, bt, 'csv'))
    s = X @ w; report(name, s); return s
for alpha in [1e-3, 1e-2]:
    probe(F[:, -1], alpha, 0.5, f'csv final a={alpha}')
for l in [6, 10, 14, 18, 22, 26]:
    probe(F[:, l], 1e-2, 0.5, f'csv layer {l}')

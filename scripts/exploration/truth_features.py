# Issue 13 exploration (2026-11-29), kept as run: multi-layer end-of-turn features of the train CSV
# answers and of the policy's own answers to train questions (benchmarks/results/truthfulqa_train_explore_*).
# Writes /tmp/exp/feats.{npy,json}; probes.py fits and compares the probes. Not a tested tool.
"""Multi-layer end-of-turn features for train CSV answers and generated train answers (analysis)."""
import csv, json, sys, time, copy
from collections import defaultdict
from pathlib import Path
import numpy as np, torch
sys.path.insert(0, '/work/main'); sys.path.insert(0, '/work/main/scripts')
from mahalo.app.load import find_embedded_gguf, load_causal_lm
from train_truth_head import _parts, split_answers
torch.set_num_threads(2)
D = Path('/work/main/../shared/data/truthfulqa')
R = Path('/work/main/benchmarks/results')
items, meta = [], []
for qi, row in enumerate(csv.DictReader(open(D / 'questions_train.csv'))):
    q = row['Question']
    good = list(dict.fromkeys([row['Best Answer'].strip()] + split_answers(row['Correct Answers'])))
    bad = split_answers(row['Incorrect Answers'])
    for a in good: items.append((q, a)); meta.append({'src': 'csv', 'qi': qi, 'y': 1})
    for a in bad: items.append((q, a)); meta.append({'src': 'csv', 'qi': qi, 'y': 0})
for f in ['truthfulqa_train_explore_plain_answers.csv', 'truthfulqa_train_explore_system_answers.csv', '/tmp/exp/truthfulqa_cost16_answers.csv']:
    p = Path(f) if f.startswith('/') else R / f
    for r in csv.DictReader(open(p)):
        items.append((r['question'], r['text'])); meta.append({'src': 'gen:' + p.name, 'qi': int(r['question_index']), 'y': int(r['truthful']), 'strategy': r['strategy']})
print(len(items), 'items', flush=True)
gguf = find_embedded_gguf()
model, tok = load_causal_lm(str(gguf.parent), gguf_file=gguf.name)
base = model.model
L = model.config.num_hidden_layers + 1
out = np.zeros((len(items), L, model.config.hidden_size), dtype=np.float16)
by_q = defaultdict(list)
for i, (q, _) in enumerate(items): by_q[q].append(i)
pad = tok.pad_token_id or 0
t0 = time.time(); done = 0
with torch.inference_mode():
    for n, (q, rows) in enumerate(by_q.items()):
        parts = _parts(tok, q)
        prefix = torch.tensor([parts.prefix_ids])
        cache = base(input_ids=prefix, use_cache=True).cache
        seqs = [tok(items[i][1], add_special_tokens=False).input_ids[:200] + parts.suffix_ids for i in rows]
        order = sorted(range(len(rows)), key=lambda j: len(seqs[j]))
        for s in range(0, len(order), 32):
            chunk = order[s:s + 32]
            width = max(len(seqs[j]) for j in chunk)
            ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            for b, j in enumerate(chunk): ids[b, :len(seqs[j])] = torch.tensor(seqs[j])
            c = copy.deepcopy(cache); c.batch_repeat_interleave(len(chunk))
            pos = torch.arange(prefix.shape[1], prefix.shape[1] + width).expand(len(chunk), -1)
            hs = base(input_ids=ids, cache=c, position_ids=pos, use_cache=True, output_hidden_states=True).hidden_states
            last = torch.tensor([len(seqs[j]) - 1 for j in chunk]); ar = torch.arange(len(chunk))
            H = torch.stack([h[ar, last] for h in hs], 1)  # (b, L, H)
            out[[rows[j] for j in chunk]] = H.numpy().astype(np.float16)
        done += len(rows)
        if n % 50 == 0: print(n, done, round(time.time() - t0), flush=True)
np.save('/tmp/exp/feats.npy', out)
json.dump({'items': items, 'meta': meta}, open('/tmp/exp/feats.json', 'w'))
print('done', round(time.time() - t0))

"""Train vs test agreement of a saved feature drafter (is it limited by overfitting?). usage: python bench/feature_agreement.py RUN_DIR OUTPUTS_CACHE

RUN_DIR = a `fastspec train --drafter feature` output folder (drafter/, feature_data/ in pseudo, references, papers order).
Test = the target's cached greedy outputs on aclsum test[:30] (bench_hybrid.py --outputs_cache, float32)."""
import json, os, sys

import torch
from fastspec.drafters import load_drafter
from fastspec.distill.feature import agreement
from fastspec.distill.feature_data import FeatureData, extract_features
from fastspec.targets import load_target_and_tokenizer
run = sys.argv[1]
target, tok = load_target_and_tokenizer("smollm2", "cpu", dtype="float32")
drafter = load_drafter(run + "/drafter", target=target)
model = drafter.model
train = FeatureData.load(run + "/feature_data")
kinds = {"pseudo": train.sequences[:100], "references": train.sequences[100:200], "papers": train.sequences[200:]}
for name, seqs in kinds.items():
    sub = FeatureData(seqs, train.layers, train.hidden_size, train.vocab_size, train.topk)
    print(f"train {name:10s} {sub.num_tokens:7d} tok agreement d1..3", [round(a, 3) for a in agreement(model, sub)], flush=True)
cache = json.load(open(sys.argv[2]))
pairs = [(p, o) for p, o in zip(cache["key"]["prompts"], cache["outputs"])]
test = extract_features(target, pairs, layers=train.layers, topk=train.topk, progress=False,
                        cache_dir=os.path.join(run, "test_features"))
print(f"test  outputs30  {test.num_tokens:7d} tok agreement d1..3", [round(a, 3) for a in agreement(model, test)])

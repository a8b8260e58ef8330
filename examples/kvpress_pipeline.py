"""xKV inside kvpress's pipeline: the context is compressed into cross-layer SVD factors, the answer decoded from them.

Run: ``.venv/bin/python examples/kvpress_pipeline.py`` (needs kvpress: ``pip install 'xkv[eval]'``).
"""

import kvpress  # noqa: F401  (registers the "kv-press-text-generation" pipeline)
import transformers
from transformers import pipeline

from xkv import XKVConfig
from xkv.integrations.kvpress import XKVPress
from xkv.models import load

transformers.utils.logging.disable_progress_bar()
model, tokenizer = load("smollm2-135m")
pipe = pipeline("kv-press-text-generation", model=model, tokenizer=tokenizer, device="cpu")

filler = "The weather report mentions clouds over the harbour and a light wind from the west. " * 60
context = filler + "The special magic number for Seville is 8056020. " + filler
question = "What is the special magic number for Seville? Answer with the number only."

press = XKVPress(XKVConfig())  # keys at 6x, values at 3x: at least 4x overall (int4 factors)
answer = pipe(context, question=question, press=press, max_new_tokens=20)["answer"]
report = press.memory_report()
print(f"answer: {answer}")
print("expected: 8056020")
print(f"context: {report.context_compression_factor:.2f}x smaller than a dense cache (measured from the tensors)")
print(
    f"whole cache with the question, the answer and the decode workspace: {report.held_bytes / 2**20:.1f} MiB "
    f"against {report.dense_bytes / 2**20:.1f} MiB dense ({report.compression_factor:.2f}x)"
)

"""The baseline of ``bench/serving.py``: HF ``generate`` behind LitServe, batched as LitServe's LLM examples batch.

Requests gathered for ``BATCH_TIMEOUT`` seconds (up to ``ROWS``) run as one
left-padded greedy ``generate`` call; each gets its whole answer (no stream).

    python bench/serving_hf.py HF_FOLDER PORT ROWS BATCH_TIMEOUT
"""

import sys
from pathlib import Path

import litserve as ls
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dllm.module import DLLMModule  # noqa: E402


class HFGenerate(ls.LitAPI):
    """``{"prompt", "max_tokens"}`` -> ``{"text", "tokens"}`` (a stop token counted, not in the text)."""

    def __init__(self, folder: str, **kwargs):
        super().__init__(**kwargs)
        self.folder = folder

    def setup(self, device):
        module = DLLMModule(pretrained=self.folder)
        self.model, self.tokenizer, self.stop_ids = module.model.eval(), module.tokenizer, module.stop_ids

    def decode_request(self, request):
        return request["prompt"], int(request["max_tokens"])

    def batch(self, inputs):
        return inputs

    def predict(self, batch):
        prompts, budgets = zip(*batch)
        inputs = self.tokenizer(list(prompts), add_special_tokens=False, return_tensors="pt", padding=True)
        with torch.inference_mode():
            out = self.model.generate(
                **inputs, do_sample=False, max_new_tokens=max(budgets), eos_token_id=self.stop_ids,
                pad_token_id=self.tokenizer.pad_token_id,
            )  # fmt: skip
        answers = []
        for row, budget in zip(out[:, inputs.input_ids.size(1) :].tolist(), budgets):
            row = row[:budget]
            stop = next((i for i, t in enumerate(row) if t in self.stop_ids), None)
            tokens = row if stop is None else row[: stop + 1]
            body = tokens if stop is None else tokens[:-1]
            text = self.tokenizer.decode(body, skip_special_tokens=False, clean_up_tokenization_spaces=False)
            answers.append({"text": text, "tokens": len(tokens)})
        return answers

    def unbatch(self, output):
        return output

    def encode_response(self, output):
        return output


if __name__ == "__main__":
    folder, port, rows, timeout = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
    api = HFGenerate(folder, max_batch_size=rows, batch_timeout=timeout)
    ls.LitServer(api, accelerator="cpu", timeout=600).run(port=port, generate_client_file=False)

"""The baseline of ``bench/serving.py``: HF ``generate`` behind LitServe, batched as LitServe's LLM examples batch.

Requests gathered for ``BATCH_TIMEOUT`` seconds (up to ``ROWS``) run as one
left-padded greedy ``generate`` call. ``stream``: LitServe's batched streaming
(``stream=True``; ``predict`` yields one output per request for every token
``generate`` produces, read from a streamer as LitServe's streaming LLM
examples do), one JSON line per request and step, ``{"text", "tokens"}`` with
the text delta and the tokens so far (a finished row's lines are empty until
its batch ends, as in LitServe's loop). ``whole``: each request gets its whole
answer at its batch's end.

    python bench/serving_hf.py HF_FOLDER PORT ROWS BATCH_TIMEOUT [stream|whole]
"""

import queue
import sys
import threading
from pathlib import Path

import litserve as ls
import torch
from transformers.generation.streamers import BaseStreamer

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dllm.module import DLLMModule  # noqa: E402
from dllm.serving.stream import TextStream  # noqa: E402


class _Steps(BaseStreamer):
    """``generate``'s tokens, one ``[b]`` list per step, on a queue (the prompt's ``put`` is skipped)."""

    def __init__(self):
        self.queue, self.prompt = queue.Queue(), True

    def put(self, value):
        if self.prompt:
            self.prompt = False
            return
        self.queue.put(value.reshape(-1).tolist())

    def end(self):
        self.queue.put(None)


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

    def _generate(self, prompts, budgets, streamer=None):
        inputs = self.tokenizer(list(prompts), add_special_tokens=False, return_tensors="pt", padding=True)
        with torch.inference_mode():
            out = self.model.generate(
                **inputs, do_sample=False, max_new_tokens=max(budgets), eos_token_id=self.stop_ids,
                pad_token_id=self.tokenizer.pad_token_id, streamer=streamer,
            )  # fmt: skip
        return out[:, inputs.input_ids.size(1) :].tolist()

    def predict(self, batch):
        prompts, budgets = zip(*batch)
        inputs = self.tokenizer(list(prompts), add_special_tokens=False, return_tensors="pt", padding=True)
        with torch.inference_mode():
            out = self.model.generate(
                **inputs, do_sample=False, max_new_tokens=max(budgets), eos_token_id=self.stop_ids,
                pad_token_id=self.tokenizer.pad_token_id, streamer=getattr(self, "streamer", None),
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


class HFStream(HFGenerate):
    """The same ``generate`` call, streamed: one ``{"text": delta, "tokens": so far}`` per request and step."""

    def predict(self, batch):
        prompts, budgets = zip(*batch)
        steps = _Steps()
        worker = threading.Thread(target=self._run, args=(batch, steps), daemon=True)
        worker.start()
        streams = [TextStream(self.tokenizer, self.stop_ids) for _ in prompts]
        counts, done = [0] * len(prompts), [False] * len(prompts)
        while (step := steps.queue.get()) is not None:
            out = []
            for i, token in enumerate(step):
                if done[i]:
                    out.append({"text": "", "tokens": counts[i]})
                    continue
                counts[i] += 1
                done[i] = token in self.stop_ids or counts[i] >= budgets[i]
                out.append({"text": streams[i].push([token], last=done[i]), "tokens": counts[i]})
            yield out
        worker.join()

    def _run(self, batch, steps):
        try:
            self.streamer = steps
            HFGenerate.predict(self, batch)
        finally:
            steps.end()

    def unbatch(self, output):
        yield from output

    def encode_response(self, output):
        yield from output


if __name__ == "__main__":
    folder, port, rows, timeout = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
    stream = (sys.argv[5] if len(sys.argv) > 5 else "stream") == "stream"
    kind = HFStream if stream else HFGenerate
    api = kind(folder, max_batch_size=rows, batch_timeout=timeout, stream=stream)
    ls.LitServer(api, accelerator="cpu", timeout=600).run(port=port, generate_client_file=False)

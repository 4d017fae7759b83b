"""Serve a dllm model behind the OpenAI API (chat and text completions, streamed per forward).

    python serve.py --ckpt_path runs/tiny/checkpoints/last.ckpt --config configs/predict-tiny.yaml \\
        --model.generation.mode jacobi --server.port 8000
    python serve.py --model.pretrained HuggingFaceTB/SmolLM2-135M-Instruct --model.generation.mode jacobi

Then any OpenAI client works: ``OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="-")``.
The arguments are predict.py's (``--model.*``, ``--data.chat_template``, ``--ckpt_path``)
plus ``--server.*`` (``python serve.py --help``); docs/serving.md says more.
"""

from dllm.serving.launch import main

if __name__ == "__main__":
    main()

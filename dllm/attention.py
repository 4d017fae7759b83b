"""How a Hugging Face model's attention takes masks: 2-D, 4-D in positions, or a row at a time.

Below both users: the generation batch (``dllm.generation.batch``) and the packed training objective
(``dllm.training.packed``) build 4-D masks for the layout this reads from the model's config.
"""

from __future__ import annotations

try:  # transformers >= 5: layer types (full / sliding / ...) of any config
    from transformers.cache_utils import get_layer_types_and_kwargs
except ImportError:  # pragma: no cover
    get_layer_types_and_kwargs = None


def attention_layout(model) -> tuple[str, int | None, bool]:
    """How the batch must talk to ``model``'s attention.

    Returns:
        ``(kind, window, hybrid)``: ``kind`` is ``"plain"`` (causal everywhere:
        2-D masks), ``"window"`` (sliding-window layers: explicit 4-D masks in
        positions), ``"one-row"`` (sliding windows with an attention implementation
        that takes no 4-D mask: one row at a time, cached) or ``"one-row-uncached"``
        (other layer kinds: chunked, linear, recurrent: one row at a time, no cache).
        ``window`` is the sliding window; ``hybrid`` says whether full and sliding
        layers are mixed (the mask is then a dict per layer kind).
    """
    config = model.config.get_text_config(decoder=True)
    if get_layer_types_and_kwargs is not None:
        kinds = set(get_layer_types_and_kwargs(config)[0])
    else:  # pragma: no cover
        kinds = {"sliding_attention" if getattr(config, "sliding_window", None) else "full_attention"}
    if kinds <= {"full_attention"}:
        return "plain", None, False
    if not kinds <= {"full_attention", "sliding_attention"}:
        return "one-row-uncached", None, False
    window = config.sliding_window
    if getattr(config, "_attn_implementation", "sdpa") not in ("sdpa", "eager"):
        return "one-row", window, False
    return "window", window, "full_attention" in kinds

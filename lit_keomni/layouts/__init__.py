"""Released-model layouts: one weight map per layout, both ways.

A released checkpoint folder (Hugging Face ``config.json`` + safetensors, or the ChatGLM remote-code layout) enters
through the map of its layout and becomes our ``Transformer`` / ``SpeechTokenizerModel`` weights; an export goes back to
the layout it came from, so the reference code, transformers, vLLM or SGLang load it again.
"""

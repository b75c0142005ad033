"""Integrations with other libraries (Hugging Face transformers and datasets), each behind lazy imports:
`import dtrain` never imports them; using one without its extra is a UsageError naming the extra."""

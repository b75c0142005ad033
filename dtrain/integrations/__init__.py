"""Integrations with other libraries: Hugging Face transformers (models, export) and datasets.

Each stays behind lazy imports: `import dtrain` never imports them; using one without its extra is a UsageError
naming the extra.
"""

"""Making LLaVA training data from a team's own images.

- `generate`: LLaVA's instruction-generation pipeline. A text-only LLM, shown an image's captions
  and normalised object boxes as text, writes conversations, detailed descriptions and
  complex-reasoning questions about it (`annotations` reads and renders the labels, `prompts`
  holds the system prompts and examples, `client` talks to the chat endpoint, `replies` turns its
  JSON into conversations, `journal` makes a run resumable).
- `vqa`: short-answer VQA files (VQAv2, GQA, TextVQA, JSONL) as LLaVA-1.5 mixes them in, with
  its response-format prompts.
- `mix`: weighted, seeded mixing of LLaVA files, with a summary table.

`llava-edge data generate|vqa|mix` are thin wrappers over these. Nothing here is imported by
the runtime.
"""

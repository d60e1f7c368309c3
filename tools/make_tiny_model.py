"""A tiny random HF model of a supported family with a chat tokenizer (soft.conversion.tiny)."""

from soft.conversion.tiny import main

if __name__ == "__main__":
    raise SystemExit(main())

"""Evaluation and dynamic inference of exported SoFT models (HF LlamaForCausalLM folders).

Every sub-model "first k layers + model.norm + lm_head" of one loaded model is usable (an ICT
export's early exits use their own norm + head instead, from exit_heads.safetensors):
- `evaluate_exits` / `run_eval_exits`: loss, perplexity, TriviaQA exact match (mean and per
  example) and speed per exit.
- `greedy_generate`: greedy decoding with the full model or any exit (own KV cache, shared weights).
- `dynamic_generate`: per-token confidence-based early exit (lazy exact KV recompute).
- `speculative_generate`: self-speculative decoding, a shallow exit drafts, the full model verifies.
"""

from soft.evaluation.decoding import GenerationResult, LayerRunner, greedy_generate
from soft.evaluation.dynamic import dynamic_generate
from soft.evaluation.inference import GenerateOptions, generate_ids, generate_text
from soft.evaluation.losses import TokenizedExample, exit_nll, tokenize_example
from soft.evaluation.metrics import exact_match, normalize_answer
from soft.evaluation.model_io import ExportedModel, load_exported_model, resolve_exits
from soft.evaluation.records import EvalExample, load_eval_examples
from soft.evaluation.runner import ExitEvaluation, ExitRecord, evaluate_exits, run_eval_exits
from soft.evaluation.speculative import speculative_generate

__all__ = [
    "EvalExample",
    "ExitEvaluation",
    "ExitRecord",
    "ExportedModel",
    "GenerateOptions",
    "GenerationResult",
    "LayerRunner",
    "TokenizedExample",
    "dynamic_generate",
    "evaluate_exits",
    "exact_match",
    "exit_nll",
    "generate_ids",
    "generate_text",
    "greedy_generate",
    "load_eval_examples",
    "load_exported_model",
    "normalize_answer",
    "resolve_exits",
    "run_eval_exits",
    "speculative_generate",
    "tokenize_example",
]

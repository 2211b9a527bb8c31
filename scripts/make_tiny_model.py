"""Build a tiny tokenizer and a tiny random Llama, offline, for tests and CI smoke runs.

The tokenizer is a byte-level BPE trained in memory on generated text; its chat template is ChatML that starts
with the BOS token, and its post-processor adds a BOS too (as Llama tokenizers do), so a trainer that renders the
template and then tokenises with special tokens gets two BOS tokens: the trap the tests check we avoid.

    python scripts/make_tiny_model.py OUT_DIR [llama | mixtral | qwen2_moe]
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

SPECIALS = ["<|endoftext|>", "<s>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] "
    "+ '<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
WORDS = ("the a of to and in is it you that he was for on are with as I his they be at one have this from or had by "
         "word but what some we can out other were all there when up use your how said an each she which do their "
         "time if will way about many then them write would like so these her long make thing see him two has look "
         "more day could go come did number sound no most people my over know water than call first who may down "
         "side been now find any new work part take get place made live where after back little only round man year "
         "came show every good me give our under name very through just form sentence great think say help low line "
         "positive negative answer question date month capital france paris january march user assistant system "
         "0 1 2 3 4 5 6 7 8 9 + - = ? . , ! : ; ( ) \" '").split()


def corpus(n: int = 3000, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 20))) for _ in range(n)]


def build_tokenizer(vocab_size: int = 400):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus(), trainer=trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>", unk_token=None)
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_model(tokenizer, layers: int = 2, hidden: int = 32, seed: int = 0, tie: bool = False):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=tie, attention_dropout=0.0,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def build_moe(tokenizer, kind: str, layers: int = 2, hidden: int = 32, experts: int = 4, seed: int = 0):
    """A tiny mixture-of-experts model: `mixtral` (routed experts only) or `qwen2_moe` (routed experts plus a
    shared expert with its own gate)."""
    import torch
    from transformers import MixtralConfig, MixtralForCausalLM, Qwen2MoeConfig, Qwen2MoeForCausalLM

    common = dict(vocab_size=len(tokenizer), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=1024, num_experts_per_tok=2,
                  bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                  pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False, attention_dropout=0.0)
    if kind == "mixtral":
        config, cls = MixtralConfig(intermediate_size=2 * hidden, num_local_experts=experts, **common), \
            MixtralForCausalLM
    elif kind == "qwen2_moe":
        config, cls = Qwen2MoeConfig(intermediate_size=2 * hidden, moe_intermediate_size=hidden,
                                     shared_expert_intermediate_size=2 * hidden, num_experts=experts,
                                     decoder_sparse_step=1, mlp_only_layers=[], **common), Qwen2MoeForCausalLM
    else:
        raise ValueError(f"unknown MoE kind {kind!r}")
    torch.manual_seed(seed)
    model = cls(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def build_teacher(folder: Path, seed: int = 7) -> Path:
    """A distillation teacher for the tiny model: other weights and a sharper head (a random tiny model is nearly
    uniform), the same tokenizer."""
    import torch

    tok = build_tokenizer()
    model = build_model(tok, seed=seed)
    with torch.no_grad():
        model.lm_head.weight.mul_(20)
    model.save_pretrained(str(folder))
    tok.save_pretrained(str(folder))
    return folder


def build(folder: Path, arch: str = "llama", **model_kwargs) -> Path:
    """Write a tiny transformers model folder (safetensors + tokenizer + chat template) and return it. `arch`:
    llama (dense), or mixtral / qwen2_moe (mixture of experts)."""
    folder = Path(folder)
    tokenizer = build_tokenizer()
    model = build_model(tokenizer, **model_kwargs) if arch == "llama" else build_moe(tokenizer, arch, **model_kwargs)
    model.save_pretrained(str(folder), safe_serialization=True)
    tokenizer.save_pretrained(str(folder))
    return folder


if __name__ == "__main__":
    out = build(Path(sys.argv[1] if len(sys.argv) > 1 else "tiny-model"), *sys.argv[2:3])
    print(out)

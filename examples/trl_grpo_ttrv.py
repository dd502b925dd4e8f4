"""TTRV's label-free reward in TRL's GRPOTrainer: a minimal, runnable example (CPU, about a minute).

    pip install -e ".[trl]"
    python examples/trl_grpo_ttrv.py                      # a tiny random Llama built here, no download
    python examples/trl_grpo_ttrv.py --model ./my-model   # a local causal LM folder (config, weights, tokenizer)
    python examples/trl_grpo_ttrv.py --reward gated --steps 4

The dataset has no labels: TRL samples ``num_generations`` completions per prompt, ``ttrv_reward`` reads each one's
answer (a choice letter, thanks to the ``choices`` column) and rewards it by how often the group gave it, plus the
paper's entropy term. ``prompt_id`` names each prompt's group; without it the prompt text would. What TRL does
differently from ``ttrv-edge adapt`` is listed in the docstring of ``ttrv_edge.integrations.trl``.
"""

from __future__ import annotations

import argparse
import tempfile

from ttrv_edge.integrations.trl import frequency_reward, gated_reward, ttrv_reward

REWARDS = {"ttrv": ttrv_reward, "frequency": frequency_reward, "gated": gated_reward}
QUESTIONS = [
    ("What colour is the sky ?", ["red", "blue", "green", "black"]),
    ("What colour is grass ?", ["blue", "green", "white", "red"]),
    ("What colour is snow ?", ["black", "red", "white", "green"]),
    ("What colour is coal ?", ["white", "green", "blue", "black"]),
]


def prompt_text(question: str, choices: list[str]) -> str:
    """The prompt as ``ttrv-edge --choices`` writes it: the question, lettered options, then the instruction."""
    options = " ".join(f"{'ABCD'[i]} . {choice}" for i, choice in enumerate(choices))
    return f"{question} {options} Answer with the option's letter ."


def dataset():
    """The training set: ``prompt`` (what TRL samples from), ``prompt_id`` (the group) and ``choices`` (how answers
    are read). Any other column would reach the reward function too, as a list aligned with the completions."""
    from datasets import Dataset

    rows = [
        {"prompt": prompt_text(question, choices), "prompt_id": index, "choices": choices}
        for index, (question, choices) in enumerate(QUESTIONS)
    ]
    return Dataset.from_list(rows)


def tiny_model(seed: int = 0):
    """A 2-layer Llama (hidden 32) and a WordLevel tokenizer over the dataset's words, built offline."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<unk>", "<pad>", "<s>", "</s>"]
    words = sorted({w for q, c in QUESTIONS for w in prompt_text(q, c).split()} | set("ABCD"))
    vocab = {token: i for i, token in enumerate(specials + words)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=True)  # joins tokens with spaces
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )
    tokenizer.padding_side = "left"
    config = LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        pad_token_id=vocab["<pad>"],
        bos_token_id=vocab["<s>"],
        eos_token_id=vocab["</s>"],
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config), tokenizer


def trainer(model, tokenizer, output_dir: str, reward=ttrv_reward, steps: int = 2, lr: float = 1e-2, seed: int = 0):
    """A GRPOTrainer with ``reward`` as its only reward function, sized for a CPU: 2 prompts x 4 completions of at
    most 6 tokens per step."""
    from dataclasses import fields

    from trl import GRPOConfig, GRPOTrainer

    # TRL turns activation checkpointing on by default; pointless for a tiny model (transformers 5 renamed the option)
    names = {f.name for f in fields(GRPOConfig)}
    checkpointing = "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"
    args = GRPOConfig(
        output_dir=output_dir,
        num_generations=4,  # N, the completions per prompt that the reward compares
        per_device_train_batch_size=8,  # 2 prompts x N per step
        max_completion_length=6,  # the answer is a letter: a few tokens are enough
        temperature=1.0,
        learning_rate=lr,
        max_steps=steps,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        bf16=False,
        **{checkpointing: False},
        disable_tqdm=True,
        seed=seed,
    )
    return GRPOTrainer(model=model, reward_funcs=reward, args=args, train_dataset=dataset(), processing_class=tokenizer)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="a local causal LM folder (default: a tiny random Llama built here)")
    parser.add_argument("--reward", choices=sorted(REWARDS), default="ttrv")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--output-dir", help="TRL's output folder (default: a temporary one)")
    args = parser.parse_args(argv)
    if args.model:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model, tokenizer = AutoModelForCausalLM.from_pretrained(args.model), AutoTokenizer.from_pretrained(args.model)
    else:
        model, tokenizer = tiny_model()
    with tempfile.TemporaryDirectory() as scratch:
        run = trainer(model, tokenizer, args.output_dir or scratch, REWARDS[args.reward], args.steps, args.lr)
        run.train()
    for record in run.state.log_history:
        if "reward" in record:
            print(f"step {record['step']}: reward {record['reward']:+.3f} (std {record['reward_std']:.3f})")


if __name__ == "__main__":
    main()
